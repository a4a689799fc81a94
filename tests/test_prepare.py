"""The dataset preparers, on tiny releases written here: DIOR, DOTA, FGSC-23, class folders, the demo."""
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import make_demo, prepare_dior, prepare_dota, prepare_fgsc23, prepare_folders
from conftest import ROOT
from data.chips import (ChipObject, CropOptions, SourceImage, _crop_objects, clip_box, index_images, pad_box,
                        polygon_bounds)
from tgn.class_names import DIOR_CLASSES, DOTA_CLASSES
from tgn.data import load_image, open_dataset
from tgn.errors import UserError

BACKGROUND = (20, 20, 20)


def paint_scene(path, size, boxes):
    """A flat scene with each (x0, y0, x1, y1) -> colour box painted in; boxes may overrun."""
    pixels = np.full((size[1], size[0], 3), BACKGROUND, dtype=np.uint8)
    for (x0, y0, x1, y1), colour in boxes.items():
        pixels[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100)
    return path


def assert_chip_is_region(chip_path, scene_path, box):
    """The chip has the box's size and the scene's pixels there.

    Compared in luma: JPEG's subsampled chroma smears colour edges, its luma barely moves,
    while a box off by one pixel would bring in a whole row or column of background.
    """
    chip = np.asarray(Image.open(chip_path).convert("L"), dtype=np.float32)
    x0, y0, x1, y1 = box
    region = np.asarray(Image.open(scene_path).convert("L"), dtype=np.float32)[y0:y1, x0:x1]
    assert chip.shape == region.shape
    assert np.abs(chip - region).mean() < 1


def anno_lines(root, name, subset):
    return (Path(root) / "anno" / f"{name}_{subset}.txt").read_text().splitlines()


def exit_code(main, argv):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


# ---------------------------------------------------------------- boxes


def test_clip_box_rounds_outward_clips_and_rejects_degenerate():
    assert clip_box((4, 6, 20, 18), 64, 48) == (4, 6, 20, 18)
    assert clip_box((4.6, 6.2, 19.1, 17.5), 64, 48) == (4, 6, 20, 18)
    assert clip_box((50, 30, 80, 60), 64, 48) == (50, 30, 64, 48)
    assert clip_box((-5, -5, 3, 2), 64, 48) == (0, 0, 3, 2)
    assert clip_box((10, 10, 10, 20), 64, 48) is None  # zero width
    assert clip_box((5.7, 10, 5.2, 20), 64, 48) is None  # negative width, not rounded into a pixel
    assert clip_box((70, 5, 90, 20), 64, 48) is None  # entirely outside
    assert clip_box((64, 5, 90, 20), 64, 48) is None and clip_box((-10, 5, 0, 20), 64, 48) is None  # touching
    assert clip_box(pad_box((10, 10, 20, 30), 0.5), 64, 48) == (5, 0, 25, 40)
    assert polygon_bounds([42.5, 60.7, 55, 40], [5.2, 12, 30.1, 20]) == (40, 5.2, 60.7, 30.1)


# ---------------------------------------------------------------- DIOR

DIOR_SCENES = {  # image id -> (folder, [(class name, box, colour)]), in XML order
    "00001": ("JPEGImages-trainval", [
        ("airplane", (4, 6, 20, 18), (230, 40, 40)),
        ("vehicle", (30, 10, 40, 30), (40, 230, 40)),
        ("ship", (10, 10, 10, 20), None),  # zero width
        ("ship", (70, 5, 90, 20), None),  # outside the 64 x 48 scene
        ("storagetank", (50, 30, 80, 60), (40, 40, 230)),  # overruns: clipped to (50, 30, 64, 48)
    ]),
    "00002": ("JPEGImages-test", [
        ("Expressway-Service-area", (8, 8, 40, 40), (230, 230, 40)),
        ("windmill", (45, 5, 48, 8), (230, 40, 230)),  # 3 x 3
    ]),
    "00003": ("JPEGImages-test", [
        ("ship", (0, 0, 30, 20), (40, 230, 230)),
        ("vehicle", (35, 25, 60, 45), (200, 200, 200)),
    ]),
}
# The default puts train and val into our train set, test into our test set.
DIOR_SETS = {"train": ["00000"], "val": ["00001"], "test": ["00002", "00003"]}
# A preparer refuses a class without training chips (every stage would): scene 00000 holds
# one object of each class the tests' own DIOR scenes leave out of train; P0000, of every
# DOTA class.
FILLER_SCENES = ("00000", "P0000")


def filler_objects(class_names, present):
    """(class name, 8 x 8 box, no colour) of each class not in `present`, placed in a row."""
    missing = [name for name in class_names if name not in present]
    return [(name, (3 * index, 3 * (index % 2), 3 * index + 8, 3 * (index % 2) + 8), None)
            for index, name in enumerate(missing)]


def shown(entries):
    """The entries of the tests' own scenes: the filler scene's left out."""
    return [entry for entry in entries if entry.relpath.split("/")[-1].rsplit("_", 1)[0] not in FILLER_SCENES]


def voc_xml(objects):
    parts = [f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{box[0]}</xmin>"
             f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
             for name, box, _ in objects]
    return f"<annotation><size><width>64</width><height>48</height></size>{''.join(parts)}</annotation>"


@pytest.fixture
def dior_src(tmp_path):
    src = tmp_path / "DIOR"
    annotations = src / "Annotations" / "Horizontal Bounding Boxes"
    annotations.mkdir(parents=True)
    filler = ("JPEGImages-trainval", filler_objects(DIOR_CLASSES, {"airplane", "vehicle", "storage tank"}))
    for image_id, (folder, objects) in {"00000": filler, **DIOR_SCENES}.items():
        paint_scene(src / folder / f"{image_id}.jpg", (64, 48), {box: c for _, box, c in objects if c})
        (annotations / f"{image_id}.xml").write_text(voc_xml(objects))
    (src / "ImageSets" / "Main").mkdir(parents=True)
    for name, ids in DIOR_SETS.items():
        (src / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return src


def test_dior_crops_one_chip_per_object_with_class_and_box(dior_src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_dior.main(["--src", str(dior_src), "--out", str(out), "--workers", "1"])
    info = open_dataset(out)
    assert info.name == "DIOR" and len(info.class_names) == 20
    # Words, for CLIP: the XML's 'Expressway-Service-area' and 'storagetank' are these classes.
    assert info.class_names[0] == "airplane" and info.class_names[7] == "expressway service area"
    assert info.class_names[15] == "storage tank" and info.class_names[19] == "windmill"
    train, test = shown(info.entries("train")), info.entries("test")
    assert {(e.relpath, e.class_id) for e in train} == {
        ("0/00001_0.jpg", 0), ("18/00001_1.jpg", 18), ("15/00001_4.jpg", 15)}
    assert {(e.relpath, e.class_id) for e in test} == {
        ("7/00002_0.jpg", 7), ("19/00002_1.jpg", 19), ("13/00003_0.jpg", 13), ("18/00003_1.jpg", 18)}
    scene = dior_src / "JPEGImages-trainval" / "00001.jpg"
    assert_chip_is_region(out / "train/0/00001_0.jpg", scene, (4, 6, 20, 18))
    assert_chip_is_region(out / "train/15/00001_4.jpg", scene, (50, 30, 64, 48))
    chip = np.asarray(Image.open(out / "train/0/00001_0.jpg"), dtype=np.float32)
    assert np.abs(chip.mean(axis=(0, 1)) - (230, 40, 40)).max() < 15  # the painted airplane
    printed = capsys.readouterr().out
    assert "degenerate box: 1, outside the image: 1" in printed
    assert "(24 images)" in printed  # 17 of them the filler scene's
    airplane = next(line for line in printed.splitlines() if re.match(r"\s+0\s+airplane", line))
    assert airplane.split()[-2:] == ["1", "0"]  # train, test: the table checked against the paper's counts
    for subset in ("train", "test"):  # by class id as a number (10 after 2), then name
        keys = [(int(line.rsplit(" ", 1)[1]), line.rsplit(" ", 1)[0])
                for line in (out / "anno" / f"DIOR_{subset}.txt").read_text().splitlines()]
        assert keys == sorted(keys) and any(cid >= 10 for cid, _ in keys)


def test_dior_min_size_context_and_set_choice(dior_src, tmp_path, capsys):
    out = tmp_path / "out"
    (dior_src / "ImageSets/Main/train.txt").write_text("00000\n00001\n00002\n")  # val is left out
    (dior_src / "ImageSets/Main/test.txt").write_text("00003\n")
    prepare_dior.main(["--src", str(dior_src), "--out", str(out), "--workers", "1", "--min-size", "4",
                       "--context", "0.25", "--train-sets", "train", "--test-sets", "test"])
    assert "smaller than --min-size: 1" in capsys.readouterr().out
    info = open_dataset(out)
    assert sorted(e.relpath for e in shown(info.entries("train"))) == [
        "0/00001_0.jpg", "15/00001_4.jpg", "18/00001_1.jpg", "7/00002_0.jpg"]
    assert len(info.entries("test")) == 2
    # (4, 6, 20, 18) padded by a quarter of 16 x 12 on each side: (0, 3, 24, 21)
    assert_chip_is_region(out / "train/0/00001_0.jpg", dior_src / "JPEGImages-trainval/00001.jpg", (0, 3, 24, 21))


def test_dior_keeps_difficult_objects_and_crops_an_id_of_two_lists_once(dior_src, tmp_path):
    """Difficult and truncated objects are kept, as the official chips have them; a scene
    listed in train.txt and val.txt (both train sets by default) is one scene."""
    xml = dior_src / "Annotations/Horizontal Bounding Boxes/00001.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>",
                                           "<difficult>1</difficult><truncated>1</truncated>", 1))
    (dior_src / "ImageSets/Main/train.txt").write_text("00000\n00001\n")  # 00001 is in val.txt too
    prepare_dior.main(["--src", str(dior_src), "--out", str(tmp_path / "out"), "--workers", "1"])
    lines = anno_lines(tmp_path / "out", "DIOR", "train")
    assert len(lines) == len(set(lines)) and "0/00001_0.jpg 0" in lines


def test_dior_a_scene_in_train_and_test_sets_is_refused(dior_src, tmp_path, capsys):
    argv = ["--src", str(dior_src), "--out", str(tmp_path / "out"), "--test-sets", "val,test"]
    assert exit_code(prepare_dior.main, argv) == 2
    assert "00001 in both train and test" in capsys.readouterr().err


def test_a_chip_past_pils_image_limit_is_skipped_and_counted_not_written(dior_src, tmp_path, monkeypatch, capsys):
    """Every stage refuses an image past twice PIL's limit: a chip that large is left out
    with the others skipped, not written for them to stop at."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # scenes are 64 x 48: past it, and still cropped
    out = tmp_path / "out"
    prepare_dior.main(["--src", str(dior_src), "--out", str(out), "--workers", "1"])
    assert "past twice PIL's image limit: 1" in capsys.readouterr().out  # 32 x 32
    written = {entry.relpath for subset in ("train", "test") for entry in open_dataset(out).entries(subset)}
    assert "7/00002_0.jpg" not in written and "13/00003_0.jpg" in written  # 30 x 20, read with a warning: kept


def test_dior_parallel_workers_write_the_same_dataset(dior_src, tmp_path):
    for workers in ("1", "2"):
        prepare_dior.main(["--src", str(dior_src), "--out", str(tmp_path / workers), "--workers", workers])
    for subset in ("train", "test"):
        assert anno_lines(tmp_path / "1", "DIOR", subset) == anno_lines(tmp_path / "2", "DIOR", subset)


def test_dior_unknown_class_is_a_one_line_error_naming_the_file(dior_src, tmp_path, capsys):
    xml = dior_src / "Annotations" / "Horizontal Bounding Boxes" / "00003.xml"
    xml.write_text(xml.read_text().replace("<name>ship</name>", "<name>spaceship</name>"))
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "00003.xml: object " in error and "spaceship" in error
    assert "\n" not in error
    xml.write_text(xml.read_text().replace("<name>spaceship</name>", "<name> </name>"))
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("00003.xml: object 0 has no <name>")


def test_dior_r_oriented_boxes_point_to_the_horizontal_ones(dior_src, tmp_path, capsys):
    xml = dior_src / "Annotations" / "Horizontal Bounding Boxes" / "00003.xml"
    xml.write_text(xml.read_text().replace("bndbox>", "robndbox>"))
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "00003.xml: object 0 has an oriented box (robndbox, DIOR-R); pass --annotations the folder of horizontal "
        "boxes (DIOR's Annotations/'Horizontal Bounding Boxes')")


@pytest.mark.parametrize("flag", ["--context", "--min-size"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_crop_settings_must_be_finite(dior_src, tmp_path, capsys, flag, value):
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(tmp_path / "out"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {flag}") and "\n" not in err and not (tmp_path / "out").exists()


def test_an_unreadable_scene_leaves_no_partial_dataset(dior_src, tmp_path, capsys):
    """Scenes are decoded as they are cropped: one that fails stops the run, and the chips of
    the scenes before it are removed, so that --out stays usable for the rerun; with
    --overwrite, the dataset prepared before stays as it was."""
    scene = dior_src / "JPEGImages-test" / "00003.jpg"
    good = scene.read_bytes()
    scene.write_bytes(good[:len(good) // 2])
    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    assert exit_code(prepare_dior.main, argv) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    scene.write_bytes(good)
    prepare_dior.main(argv)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert len(open_dataset(out).entries("test")) == 4

    scene.write_bytes(good[:len(good) // 2])
    assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    # A run killed midway leaves its hidden build folder: the next run clears it.
    (out / ".preparing" / "train").mkdir(parents=True)
    (out / ".preparing" / "train" / "stale.jpg").write_bytes(b"")
    scene.write_bytes(good)
    prepare_dior.main([*argv, "--overwrite"])
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    shutil.rmtree(out / "train")
    (out / ".preparing").mkdir()
    shutil.move(str(out / "test"), str(out / ".preparing"))
    for item in ("anno", "classes.json"):
        (out / item).unlink() if (out / item).is_file() else shutil.rmtree(out / item)
    prepare_dior.main(argv)  # only the killed build's folder there: not "other files"
    assert sorted(path.name for path in out.iterdir()) == [".lock", "anno", "classes.json", "test", "train"]


def test_a_dataset_folder_another_preparer_writes_to_is_refused(dior_src, tmp_path, capsys):
    """Two preparers on one --out would remove each other's build (a killed run's, to each)."""
    from test_reliability import hold_folder

    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    prepare_dior.main(argv)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    (out / ".preparing").mkdir()  # the other run's build
    holder = hold_folder(out, "checking")
    try:
        assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
        assert f"--out {out} is in use by another run (pid {holder.pid} on " in one_error(capsys)
        assert (out / ".preparing").is_dir()
    finally:
        holder.kill()
        holder.wait()
    (out / ".preparing").rmdir()
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".lock"} == {k: v for k, v in before.items() if k.name != ".lock"}
    prepare_dior.main([*argv, "--overwrite"])  # free once the other run has ended


def test_a_refused_rename_while_replacing_the_dataset_keeps_the_previous_one(dior_src, tmp_path, capsys,
                                                                             monkeypatch):
    """Windows refuses to rename a folder with a file held open: the swap's renames are
    undone, whether an old item could not move aside or a new one could not move in; if
    even that fails, the next run says where each dataset's items are."""
    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    prepare_dior.main(argv)

    def files():
        return {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}

    before = files()
    rename = Path.rename

    def refusing(refused):
        def rename_unless_refused(source, target):
            if refused(Path(source)):
                raise PermissionError(13, "Access is denied")
            return rename(source, target)
        return rename_unless_refused

    for refused in (lambda source: source.parent == out and source.name == "test",  # the old test/ moving aside
                    lambda source: source.parent.name == ".preparing" and source.name == "classes.json"):  # moving in
        monkeypatch.setattr(Path, "rename", refusing(refused))
        assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
        error = one_error(capsys)
        assert "cannot move the new dataset into place (Access is denied); the previous one is kept" in error
        assert files() == before
        assert sorted(path.name for path in out.iterdir()) == [".lock", "anno", "classes.json", "test", "train"]

    fresh = tmp_path / "fresh"  # no dataset before: nothing is said to be kept, and nothing is left
    assert exit_code(prepare_dior.main, [*argv[:-3], str(fresh), "--workers", "1"]) == 2
    assert "is kept" not in one_error(capsys) and not fresh.exists()

    renames = {"count": 0}

    def refuse_after_the_first_moves(source, target):
        renames["count"] += 1
        if renames["count"] > 2 and Path(source).parent.name in ("out", ".replaced", ".preparing"):
            raise PermissionError(13, "Access is denied")
        return rename(source, target)

    monkeypatch.setattr(Path, "rename", refuse_after_the_first_moves)
    assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
    assert "nor the previous one back; the previous dataset's items are in" in one_error(capsys)
    monkeypatch.setattr(Path, "rename", rename)
    assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
    error = one_error(capsys)
    assert "an earlier run stopped while it moved its dataset into place" in error and ".replaced" in error
    assert (out / ".replaced" / "train").is_dir() and (out / ".replaced" / "test").is_dir()


def test_refuses_a_non_empty_output_unless_overwrite(dior_src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    prepare_dior.main(argv)
    stale = out / "train" / "0" / "stale.jpg"
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert exit_code(prepare_dior.main, argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert stale.exists()
    prepare_dior.main(argv + ["--overwrite"])
    assert not stale.exists() and (out / "notes.txt").exists()
    assert len(shown(open_dataset(out).entries("train"))) == 3


def one_error(capsys):
    """The single error line of a failed run; no traceback besides it."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # besides progress bars
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_subset_left_without_chips_is_refused_and_the_earlier_dataset_kept(dior_src, dota_src, tmp_path, capsys):
    """Objects found, none cropped (--min-size above them all, all difficult): refused after
    cropping, naming what emptied the subset, with --out as it was."""
    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    prepare_dior.main(argv)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert exit_code(prepare_dior.main, [*argv, "--overwrite", "--min-size", "100"]) == 2
    assert one_error(capsys) == ("error: no train chips: all 22 train objects were skipped (degenerate box: 1, "
                                 "outside the image: 1, smaller than --min-size: 20); --out is left as it was")
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    argv = ["--src", str(dior_src), "--out", str(tmp_path / "new"), "--min-size", "100"]
    assert exit_code(prepare_dior.main, argv) == 2
    assert "no train chips" in one_error(capsys) and not (tmp_path / "new").exists()
    (dota_src / "val/labelTxt/P0002.txt").write_text("5 5 25 5 25 20 5 20 harbor 1\n30 30 50 30 50 50 30 50 ship 1\n")
    argv = ["--src", str(dota_src), "--out", str(out), "--workers", "1", "--overwrite", "--skip-difficult"]
    assert exit_code(prepare_dota.main, argv) == 2
    assert one_error(capsys).startswith("error: no test chips: all 2 test objects were skipped "
                                        "(difficult (--skip-difficult): 2)")
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_class_left_without_training_chips_is_refused_before_or_after_cropping(dior_src, dota_src, tmp_path,
                                                                                  capsys):
    """classes.json lists every class of the release, and every stage stops at one without
    training images: the preparer says so first, before cropping when no training object is
    labelled with it, after when all its objects were skipped; a class without test chips
    is warned about."""
    out = tmp_path / "out"
    argv = ["--src", str(dior_src), "--out", str(out), "--workers", "1"]
    with pytest.warns(UserWarning, match=r"16 of 20 classes have no test chips, e\.g\. 0 \(airplane\)"):
        prepare_dior.main(argv)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    (dior_src / "ImageSets/Main/train.txt").write_text("")  # the filler scene left out
    assert exit_code(prepare_dior.main, [*argv, "--overwrite"]) == 2
    assert one_error(capsys) == (
        "error: class 1 (airport) and 15 more classes have no training object in the train subset's annotations: "
        "every stage needs training images of each class (check --train-sets and the lists in --image-sets)")
    (dior_src / "ImageSets/Main/train.txt").write_text("00000\n")
    xml = dior_src / "Annotations" / "Horizontal Bounding Boxes" / "00000.xml"
    xml.write_text(xml.read_text().replace("<xmax>8</xmax><ymax>8</ymax>", "<xmax>2</xmax><ymax>8</ymax>"))
    assert exit_code(prepare_dior.main, [*argv, "--overwrite", "--min-size", "4"]) == 2
    assert one_error(capsys).startswith("error: class 1 (airport) has no training chips (skipped objects of every "
                                        "class: degenerate box: 1, outside the image: 1, smaller than --min-size: 1)")
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    labels = dota_src / "train/labelTxt/P0000.txt"  # its only helicopter difficult
    labels.write_text(labels.read_text().replace("helicopter 0", "helicopter 1"))
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "dota"), "--workers", "1",
                                         "--skip-difficult"]) == 2
    assert one_error(capsys).startswith("error: class 14 (helicopter) has no training object in the train subset's "
                                        "annotations (left out: difficult (--skip-difficult): 2): every stage")


@pytest.mark.parametrize("pixels, problem", [
    (np.full((48, 64), 0.5, dtype=np.float32), "32-bit float pixels have no fixed range"),
    (np.full((48, 64), 70000, dtype=np.int32),
     "its integer pixels reach 70000, outside 0..65535, so they have no fixed scale to 8 bits"),
], ids=["float", "beyond 16 bits"])
def test_scenes_without_a_scale_to_8_bits_are_refused_not_cropped_black_or_white(dior_src, tmp_path, capsys, pixels,
                                                                                   problem):
    scene = dior_src / "JPEGImages-test" / "00003.jpg"
    Image.fromarray(pixels).save(scene.with_suffix(".tif"))
    scene.unlink()
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(tmp_path / "out"), "--workers",
                                         "1"]) == 2
    assert one_error(capsys).endswith(f"00003.tif: {problem}; convert the scene to 8 or 16 bits")


def test_two_scenes_of_one_name_and_size_are_told_apart_by_content(dior_src, tmp_path):
    """Uncompressed scenes of one size have as many bytes: only their content tells a copy."""
    trainval = dior_src / "JPEGImages-trainval"
    for name, colour in (("00009.bmp", (1, 2, 3)), ("copy/00009.bmp", (1, 2, 3)), ("other/00009.bmp", (9, 9, 9))):
        paint_scene(trainval / name, (64, 48), {(0, 0, 5, 5): colour})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index_images([trainval, trainval / "copy"])  # a copy: no matter
    with pytest.warns(UserWarning, match="1 images share their name with another image file"):
        index_images([trainval, trainval / "other"])


def run_preparer_slowly(dior_src, out, **popen):
    """prepare_dior.py in a process of its own, each scene taking 0.5 s to crop (the
    workers are forked from the patched module)."""
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import data.chips as chips; "
              "crop = chips._crop_objects; "
              "chips._crop_objects = lambda *args: (time.sleep(0.5), crop(*args)); "
              "from data import prepare_dior; prepare_dior.main(sys.argv[1:])")
    for index in range(4, 12):  # 12 scenes: two workers each take a share
        paint_scene(dior_src / "JPEGImages-trainval" / f"{index:05d}.jpg", (64, 48), {})
        (dior_src / "Annotations" / "Horizontal Bounding Boxes" / f"{index:05d}.xml").write_text(
            voc_xml([("ship", (1, 1, 9, 9), None)]))
    (dior_src / "ImageSets/Main/train.txt").write_text("".join(f"{index:05d}\n" for index in (0, *range(4, 12))))
    return subprocess.Popen([sys.executable, "-c", script, "--src", str(dior_src), "--out", str(out), "--workers",
                             "2"], text=True, **popen)


def children_of(pid):
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def chips_written(out):
    return sorted(path.relative_to(out) for path in (out / ".preparing").rglob("*.jpg"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_cropping_workers_end_with_a_killed_preparer(dior_src, tmp_path):
    """A preparer killed (SIGKILL, the OOM killer) left its cropping workers running: they
    went on writing chips into the build folder, which the next run, started at once, took
    for its own."""
    out = tmp_path / "out"
    # Output to nowhere: an orphaned worker holds a pipe open, and reading it would wait for its end.
    process = run_preparer_slowly(dior_src, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (len(children_of(process.pid)) >= 2 and chips_written(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = children_of(process.pid)
    assert len(workers) >= 2 and chips_written(out), "the preparer did not start cropping"
    process.kill()
    process.wait()
    time.sleep(1.5)  # three scenes' time: an orphaned worker would have written more
    written = chips_written(out)
    time.sleep(1.5)
    assert chips_written(out) == written
    for worker in workers:
        stat = Path(f"/proc/{worker}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # ended (perhaps unreaped)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_cropping_workers_started_otherwise_than_by_fork_crop(dior_src, tmp_path, start_method):
    """Under forkserver (Linux's default from Python 3.14) a worker's parent process is the
    server: a worker that took that for its preparer's death ended at once, and the pool
    started others without end. Spawn is macOS's and Windows' default."""
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} start method here")
    script = (f"import multiprocessing, sys; sys.path.insert(0, {str(ROOT)!r}); "
              f"multiprocessing.set_start_method({start_method!r}); "
              "from data import prepare_dior; prepare_dior.main(sys.argv[1:])")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "--src", str(dior_src), "--out", str(out), "--workers",
                             "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(shown(open_dataset(out).entries("train"))) == 3


def test_ctrl_c_ends_the_cropping_workers_in_one_line(dior_src, tmp_path):
    """Ctrl-C reaches every process of the terminal: each cropping worker printed its own
    KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    process = run_preparer_slowly(dior_src, out, start_new_session=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not chips_written(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chips_written(out), "the preparer did not start cropping"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr, stderr
    assert not (out / ".preparing").exists()


def test_dior_release_copies_as_they_come(dior_src, tmp_path, monkeypatch, capsys):
    """'~' in each of --images' folders (the shell expands only the first), annotations
    named .XML, an --out a file manager left .DS_Store in; a failed run removes the parent
    folders it made for --out, and a build folder it cannot remove is one line."""
    monkeypatch.setenv("HOME", str(dior_src))
    xml = dior_src / "Annotations" / "Horizontal Bounding Boxes" / "00003.xml"
    xml.rename(xml.with_suffix(".XML"))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    prepare_dior.main(["--src", str(dior_src), "--out", str(out), "--workers", "1",
                       "--images", "~/JPEGImages-trainval,~/JPEGImages-test"])
    assert len(shown(open_dataset(out).entries("test"))) == 4
    scene = dior_src / "JPEGImages-test" / "00003.jpg"
    scene.write_bytes(scene.read_bytes()[:100])
    nested = tmp_path / "new" / "deeper" / "dior"
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(nested), "--workers", "1"]) == 2
    assert "cannot read image" in one_error(capsys) and not (tmp_path / "new").exists()
    (out / ".preparing").mkdir()
    rmtree = shutil.rmtree

    def written_into(path, *args, **kwargs):
        if Path(path).name == ".preparing":
            raise OSError(39, "Directory not empty")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", written_into)
    assert exit_code(prepare_dior.main, ["--src", str(dior_src), "--out", str(out), "--overwrite"]) == 2
    assert one_error(capsys) == (f"error: --out {out}: cannot remove .preparing, left by an earlier run (Directory "
                                 "not empty); if that run still goes, wait for its end")


def test_dior_text_that_is_not_utf8_is_a_one_line_error_naming_the_file(dior_src, tmp_path, capsys):
    argv = ["--src", str(dior_src), "--out", str(tmp_path / "out"), "--workers", "1"]
    id_list = dior_src / "ImageSets/Main/test.txt"
    id_list.write_text("00003\n", encoding="utf-16")  # what some Windows editors save
    assert exit_code(prepare_dior.main, argv) == 2
    assert re.fullmatch(r"error: .*test.txt:1: not UTF-8 text \(byte 0xff\); save the file as UTF-8",
                        one_error(capsys))
    id_list.write_text("00003\n")
    xml = dior_src / "Annotations/Horizontal Bounding Boxes/00003.xml"
    xml.write_text('<?xml version="1.0" encoding="x-unknown"?>' + voc_xml(DIOR_SCENES["00003"][1]))
    assert exit_code(prepare_dior.main, argv) == 2
    assert re.fullmatch(r"error: .*00003.xml: cannot read its XML encoding .*; save the file as UTF-8",
                        one_error(capsys))


def test_dior_xml_in_gbk_is_read_as_declared(dior_src, tmp_path):
    """Chinese annotation tools save VOC XML in GBK, which expat cannot read itself."""
    argv = ["--src", str(dior_src), "--workers", "1"]
    prepare_dior.main([*argv, "--out", str(tmp_path / "utf8")])
    xml = dior_src / "Annotations/Horizontal Bounding Boxes/00003.xml"
    text = voc_xml(DIOR_SCENES["00003"][1]).replace("<annotation>", "<annotation><folder>遥感</folder>", 1)
    assert "遥感" in text
    xml.write_bytes(('<?xml version="1.0" encoding="GBK"?>\n' + text).encode("gbk"))
    prepare_dior.main([*argv, "--out", str(tmp_path / "gbk")])
    for subset in ("train", "test"):  # the same chips, 00003's among them
        assert anno_lines(tmp_path / "gbk", "DIOR", subset) == anno_lines(tmp_path / "utf8", "DIOR", subset)
    assert any("00003" in line for subset in ("train", "test") for line in anno_lines(tmp_path / "gbk", "DIOR", subset))


# ---------------------------------------------------------------- DOTA


@pytest.fixture
def dota_src(tmp_path):
    src = tmp_path / "DOTA"
    paint_scene(src / "train/images/P0001.png", (80, 60),
                {(10, 10, 30, 25): (230, 40, 40), (40, 5, 61, 31): (40, 230, 40), (70, 40, 95, 70): (40, 40, 230)})
    paint_scene(src / "val/images/P0002.png", (80, 60),
                {(5, 5, 25, 20): (230, 230, 40), (30, 30, 50, 50): (40, 230, 230)})
    (src / "train/labelTxt").mkdir(parents=True)
    (src / "val/labelTxt").mkdir(parents=True)
    paint_scene(src / "train/images/P0000.png", (80, 60), {})
    (src / "train/labelTxt/P0000.txt").write_text("".join(
        f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {name.replace(' ', '-')} 0\n"
        for name, (x0, y0, x1, y1), _ in filler_objects(DOTA_CLASSES, set())))
    (src / "train/labelTxt/P0001.txt").write_text(
        "imagesource:GoogleEarth\ngsd:0.146343590398\n"
        "10 10 30 10 30 25 10 25 plane 0\n"
        "42.5 5.2 60.7 12 55 30.1 40 20 small-vehicle 1\n"  # rotated, difficult
        "70 40 95 40 95 70 70 70 ship 0\n")  # overruns the 80 x 60 scene
    (src / "val/labelTxt/P0002.txt").write_text(
        "imagesource:GoogleEarth\ngsd:null\n5 5 25 5 25 20 5 20 harbor 0\n\n30 30 50 30 50 50 30 50 tennis-court\n")
    return src


def test_dota_leaves_out_the_files_macos_adds_beside_each_copied_file(dota_src, tmp_path):
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x9a\xff"  # not text, not an image
    for name in ("train/labelTxt/._P0001.txt", "train/images/._P0001.png", "val/labelTxt/.DS_Store"):
        (dota_src / name).write_bytes(apple_double)
    out = tmp_path / "out"
    prepare_dota.main(["--src", str(dota_src), "--out", str(out), "--workers", "1"])
    info = open_dataset(out)
    assert sorted(e.relpath for e in shown(info.entries("train"))) == ["0/P0001_0.jpg", "4/P0001_1.jpg",
                                                                       "6/P0001_2.jpg"]
    assert len(info.entries("test")) == 2


def test_dota_crops_polygon_bounding_rectangles(dota_src, tmp_path):
    out = tmp_path / "out"
    prepare_dota.main(["--src", str(dota_src), "--out", str(out), "--workers", "1"])
    info = open_dataset(out)
    assert info.name == "DOTA" and info.class_names[0] == "plane" and info.class_names[14] == "helicopter"
    assert info.class_names[4] == "small vehicle"  # labelled 'small-vehicle'
    assert {(e.relpath, e.class_id) for e in shown(info.entries("train"))} == {
        ("0/P0001_0.jpg", 0), ("4/P0001_1.jpg", 4), ("6/P0001_2.jpg", 6)}
    assert {(e.relpath, e.class_id) for e in info.entries("test")} == {("12/P0002_0.jpg", 12), ("7/P0002_1.jpg", 7)}
    scene = dota_src / "train/images/P0001.png"
    assert_chip_is_region(out / "train/0/P0001_0.jpg", scene, (10, 10, 30, 25))
    assert_chip_is_region(out / "train/4/P0001_1.jpg", scene, (40, 5, 61, 31))
    assert_chip_is_region(out / "train/6/P0001_2.jpg", scene, (70, 40, 80, 60))


def test_dota_skip_difficult_keeps_object_numbering(dota_src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_dota.main(["--src", str(dota_src), "--out", str(out), "--workers", "1", "--skip-difficult"])
    assert sorted(e.relpath for e in shown(open_dataset(out).entries("train"))) == ["0/P0001_0.jpg", "6/P0001_2.jpg"]
    assert "difficult (--skip-difficult): 1" in capsys.readouterr().out


def test_dota_labels_of_later_versions_skip_their_extra_classes_when_asked(dota_src, tmp_path, capsys):
    labels = dota_src / "train/labelTxt/P0001.txt"
    labels.write_text(labels.read_text().replace("small-vehicle 1", "container-crane 0"))  # as v1.5 labels it
    argv = ["--src", str(dota_src), "--workers", "1"]
    assert exit_code(prepare_dota.main, [*argv, "--out", str(tmp_path / "refused")]) == 2
    assert ("P0001.txt:4: class 'container-crane' is one DOTA v1.5 or 2.0 adds to the 15 of v1.0: leave such classes "
            "out with --skip-classes (container-crane for v1.5, container-crane,airport,helipad for 2.0)"
            ) in one_error(capsys)
    assert exit_code(prepare_dota.main, [*argv, "--out", str(tmp_path / "kept"), "--skip-classes", "ship"]) == 2
    assert "--skip-classes: ship is one of the 15 DOTA v1.0 classes" in one_error(capsys)
    with pytest.warns(UserWarning, match="--skip-classes: no object is labelled helipad; nothing of it was left out"):
        prepare_dota.main([*argv, "--out", str(tmp_path / "out"), "--skip-classes", "Container-Crane,helipad"])
    assert sorted(e.relpath for e in shown(open_dataset(tmp_path / "out").entries("train"))) == ["0/P0001_0.jpg",
                                                                                          "6/P0001_2.jpg"]
    assert "class container-crane (--skip-classes): 1" in capsys.readouterr().out


def test_dota_bad_line_and_overwrite_onto_the_source_are_refused(dota_src, tmp_path, capsys):
    argv = ["--src", str(dota_src), "--out", str(dota_src), "--overwrite"]
    assert exit_code(prepare_dota.main, argv) == 2
    assert "is inside the input" in capsys.readouterr().err
    assert (dota_src / "train/images/P0001.png").exists()
    (tmp_path / "other" / "train").mkdir(parents=True)  # e.g. a DOTA_devkit split folder: not a prepared dataset
    argv = ["--src", str(dota_src), "--out", str(tmp_path / "other"), "--overwrite"]
    assert exit_code(prepare_dota.main, argv) == 2
    assert "holds other files and no prepared dataset" in capsys.readouterr().err
    assert (tmp_path / "other" / "train").is_dir()
    nested = dota_src / "train/labelTxt/labelTxt"  # labels one folder too deep: an unzip mistake
    nested.mkdir()
    for label in (dota_src / "train/labelTxt").glob("*.txt"):
        label.rename(nested / label.name)
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "out")]) == 2
    assert "no train objects found; check --src" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for label in nested.glob("*.txt"):
        label.rename(dota_src / "train/labelTxt" / (label.stem + ".TXT"))  # upper-case suffixes are labels too
    prepare_dota.main(["--src", str(dota_src), "--out", str(tmp_path / "upper"), "--workers", "1"])
    assert len(shown(open_dataset(tmp_path / "upper").entries("train"))) == 3
    with open(dota_src / "val/labelTxt/P0002.txt", "a") as handle:
        handle.write("1 2 3 plane\n")
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "out")]) == 2
    assert "P0002.txt:6" in capsys.readouterr().err


@pytest.mark.parametrize("line, hint", [
    ("10 10 30 10 30 25 plane 0", ""),  # three corners
    ("10 10 30 10 30 25 10 25 storage tank 0", " (a class name with spaces? DOTA writes them with hyphens: "
                                               "large-vehicle)"),
    ("10 10 30 10 30 25 10 25 storage tank", " (a class name with spaces? DOTA writes them with hyphens: "
                                             "large-vehicle)"),  # no difficult column
])
def test_dota_a_malformed_label_line_is_named_with_its_file_and_line(dota_src, tmp_path, capsys, line, hint):
    label = dota_src / "train/labelTxt/P0001.txt"
    label.write_text(label.read_text() + line + "\n")
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "out")]) == 2
    assert one_error(capsys) == (f"error: {label}:6: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult', got "
                                 f"{line!r}{hint}")


@pytest.mark.parametrize("train_splits, test_splits, message", [
    ("train,val", "./val", "--train-splits val and --test-splits ./val are one folder"),
    ("train,val", "val_link", "--train-splits val and --test-splits val_link are one folder"),
    ("train,extra", "val", "--train-splits/--test-splits: P0002 in both train and test"),
])
def test_dota_one_scene_in_train_and_test_is_refused(dota_src, tmp_path, capsys, train_splits, test_splits, message):
    (dota_src / "val_link").symlink_to(dota_src / "val", target_is_directory=True)
    shutil.copytree(dota_src / "val", dota_src / "extra")  # the val scenes again, under another split name
    argv = ["--src", str(dota_src), "--out", str(tmp_path / "out"), "--workers", "1",
            "--train-splits", train_splits, "--test-splits", test_splits]
    assert exit_code(prepare_dota.main, argv) == 2
    assert message in one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_dota_label_file_that_is_not_utf8_is_a_one_line_error(dota_src, tmp_path, capsys):
    label = dota_src / "val/labelTxt/P0002.txt"
    label.write_bytes(b"imagesource:GoogleEarth\ngsd:null\n5 5 25 5 25 20 5 20 harbor 0 caf\xe9\n")
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "out")]) == 2
    assert re.fullmatch(r"error: .*P0002.txt:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8",
                        one_error(capsys))


def test_dota_boxes_wholly_left_of_or_above_the_scene_are_outside_not_degenerate(dota_src, tmp_path, capsys):
    with open(dota_src / "train/labelTxt/P0001.txt", "a") as handle:
        handle.write("-30 5 -10 5 -10 15 -30 15 plane 0\n"  # left of the 80 x 60 scene
                     "10 -20 30 -20 30 -5 10 -5 plane 0\n"  # above it
                     "20 10 20 10 20 25 20 25 plane 0\n")  # zero width
    prepare_dota.main(["--src", str(dota_src), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert "skipped 3 objects (degenerate box: 1, outside the image: 2)" in capsys.readouterr().out


def test_dota_scenes_without_labels_or_with_two_files_are_said(dota_src, tmp_path, capsys):
    """A scene kept as a PNG and as a smaller JPEG, an image whose label file is missing (a
    partial download), a NaN after the first coordinate: none silent; two label files of one
    scene (P0004.txt, P0004.TXT) would cut its chips over each other."""
    paint_scene(dota_src / "train/images/P0001.jpg", (20, 15), {})  # a resized copy beside the PNG
    paint_scene(dota_src / "train/images/P0005.png", (40, 30), {})  # no labelTxt/P0005.txt
    with open(dota_src / "train/labelTxt/P0001.txt", "a") as handle:
        handle.write("1 1 nan 1 9 9 1 9 plane 0\n")
    with pytest.warns(UserWarning) as caught:
        prepare_dota.main(["--src", str(dota_src), "--out", str(tmp_path / "out"), "--workers", "1"])
    messages = [str(warning.message) for warning in caught]
    assert any(message.startswith("1 images share their name with another image file (e.g. ") and
               "P0001.jpg and " in message and "P0001.png): the first of each is cropped" in message
               for message in messages), messages
    assert any(message.startswith("1 images in ") and "have no label file in" in message and "(e.g. P0005.png)"
               in message for message in messages), messages
    # The NaN one; and the JPEG, first by name, was cropped: the PNG's boxes fall outside it.
    assert "(degenerate box: 1, outside the image: 2)" in capsys.readouterr().out
    (dota_src / "val/labelTxt/P0002.TXT").write_text("5 5 25 5 25 20 5 20 harbor 0\n")
    assert exit_code(prepare_dota.main, ["--src", str(dota_src), "--out", str(tmp_path / "twice"), "--workers",
                                         "1"]) == 2
    assert "two label files for scene P0002 (P0002.TXT, P0002.txt); keep one" in one_error(capsys)


def test_an_image_folder_given_twice_is_not_two_files_of_one_name(tmp_path):
    """DIOR's JPEGImages beside its split folders may be a link to one of them or a merged
    copy: the same images, no warning; a resized copy under the same name is warned about."""
    from data.chips import index_images

    paint_scene(tmp_path / "trainval/00001.jpg", (20, 16), {(2, 2, 8, 8): (200, 20, 20)})
    (tmp_path / "linked").symlink_to(tmp_path / "trainval")
    shutil.copytree(tmp_path / "trainval", tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = index_images([tmp_path / "trainval", tmp_path / "linked", tmp_path / "merged"])
    assert index == {"00001": tmp_path / "trainval/00001.jpg"}
    paint_scene(tmp_path / "smaller/00001.jpg", (10, 8), {})
    with pytest.warns(UserWarning, match="1 images share their name with another image file"):
        index_images([tmp_path / "trainval", tmp_path / "smaller"])


def test_context_is_a_fraction_of_the_box_as_written_and_min_size_of_its_visible_part(tmp_path):
    """An object at the border gets the context the same object gets elsewhere (the padding
    was a fraction of the clipped box); --min-size measures the box before the outward
    rounding to whole pixels (which made a 9.2 px box 11 px)."""
    assert clip_box(pad_box((50, 30, 80, 60), 0.5), 64, 48) == (35, 15, 64, 48)  # 15 px each side, then clipped
    assert polygon_bounds([1, float("nan"), 9, 1], [1, 1, 9, 9]) != polygon_bounds([1, 9, 9, 1], [1, 1, 9, 9])
    (tmp_path / "train" / "1").mkdir(parents=True)
    scene = Image.new("RGB", (20, 20), (200, 10, 10))
    image = SourceImage(tmp_path / "s.jpg", "s", "train", (ChipObject(0, 1, (0.9, 0, 10.1, 20)),))
    entries, skipped = [], Counter()
    _crop_objects(scene, image, CropOptions(out=tmp_path, min_size=10), entries, skipped)
    assert not entries and skipped == {"smaller than --min-size": 1}
    # Of its visible part: 12 px written, 4 px inside the scene.
    image = SourceImage(tmp_path / "s.jpg", "s", "train", (ChipObject(0, 1, (-8, 0, 4, 20)),))
    _crop_objects(scene, image, CropOptions(out=tmp_path, min_size=5), entries, skipped)
    assert not entries and skipped == {"smaller than --min-size": 2}
    # Cropping pads the box as written: (15, 5, 25, 10) by half of 10 x 5 is (10, 2.5, 30, 12.5),
    # clipped to (10, 2, 20, 13); padding the clipped (15, 5, 20, 10) would give 8 px wide.
    image = SourceImage(tmp_path / "s.jpg", "s", "train", (ChipObject(0, 1, (15, 5, 25, 10)),))
    _crop_objects(scene, image, CropOptions(out=tmp_path, context=0.5), entries, skipped)
    with Image.open(tmp_path / "train" / "1" / "s_0.jpg") as chip:
        assert chip.size == (10, 11)


def test_16_bit_scenes_give_the_chips_training_would_load(dota_src, tmp_path):
    """Scaled 0..65535 -> 0..255 as tgn.data.load_image scales them, not clipped at 255."""
    scene = dota_src / "train/images/P0001.png"
    pixels = np.full((60, 80), 5140, dtype=np.uint16)  # 20 of 255
    pixels[10:25, 10:30] = 40000  # the plane: 156 of 255
    Image.fromarray(pixels).save(scene)
    assert Image.open(scene).mode.startswith("I")
    out = tmp_path / "out"
    prepare_dota.main(["--src", str(dota_src), "--out", str(out), "--workers", "1"])
    chip = np.asarray(Image.open(out / "train/0/P0001_0.jpg").convert("L"), dtype=np.float32)
    expected = np.asarray(load_image(scene).convert("L"), dtype=np.float32)[10:25, 10:30]
    assert chip.shape == expected.shape and np.abs(chip - expected).mean() < 1
    assert abs(chip.mean() - 156) < 2
    pixels //= 16  # a 12-bit sensor's values: the chips would be nearly black
    Image.fromarray(pixels).save(scene)
    with pytest.warns(UserWarning, match=r"1 16-bit images use at most 14 of their 16 bits \(e.g. .*P0001.png, "
                                         r"brightest value 2500\)"):
        prepare_dota.main(["--src", str(dota_src), "--out", str(out), "--workers", "1", "--overwrite"])


# ---------------------------------------------------------------- FGSC-23


@pytest.fixture
def fgsc_src(tmp_path):
    """Every class has training images (x.jpg), 0 and 5 the ones the tests look at."""
    src = tmp_path / "FGSC-23"
    others = [f"train/{cid}/x.jpg" for cid in range(23) if cid not in (0, 5)]
    for relpath in ("train/0/a.jpg", "train/5/b.jpg", "train/5/c.jpg", "test/22/d.jpg", *others):
        paint_scene(src / relpath, (12, 10), {})
    return src


def looked_at(entries):
    return sorted((e.relpath, e.class_id) for e in entries if e.class_id in (0, 5))


@pytest.mark.parametrize("link", [None, "hard", "symlink"])
def test_fgsc_maps_class_folders(fgsc_src, tmp_path, link):
    out = tmp_path / "out"
    prepare_fgsc23.main(["--src", str(fgsc_src), "--out", str(out)] + (["--link", link] if link else []))
    info = open_dataset(out)
    assert info.name == "FGSC23" and len(info.class_names) == 23
    assert info.class_names[0] == "non-ship" and info.class_names[22] == "barge"
    assert looked_at(info.entries("train")) == [("0/a.jpg", 0), ("5/b.jpg", 5), ("5/c.jpg", 5)]
    assert len(info.entries("train")) == 3 + 21
    assert [(e.relpath, e.class_id) for e in info.entries("test")] == [("22/d.jpg", 22)]
    placed, source = out / "train/5/b.jpg", fgsc_src / "train/5/b.jpg"
    assert placed.read_bytes() == source.read_bytes()
    assert placed.is_symlink() == (link == "symlink")
    assert os.path.samefile(placed, source) == (link in ("hard", "symlink"))


def test_fgsc_warns_of_classes_without_test_images_and_takes_both_dirs_without_src(fgsc_src, tmp_path, capsys):
    """As the other preparers: a class without test images is said (its accuracy is n/a);
    --train-dir and --test-dir need no --src, which was required and then counted as an
    input --out must not be inside."""
    with pytest.warns(UserWarning, match=r"22 of 23 classes have no test images, e\.g\. 0 \(non-ship\)"):
        prepare_fgsc23.main(["--train-dir", str(fgsc_src / "train"), "--test-dir", str(fgsc_src / "test"),
                             "--out", str(tmp_path / "out")])
    assert len(open_dataset(tmp_path / "out").entries("test")) == 1
    assert exit_code(prepare_fgsc23.main, ["--train-dir", str(fgsc_src / "train"), "--out", str(tmp_path / "o")]) == 2
    assert one_error(capsys) == "error: pass --src, the unpacked FGSC-23 release (or both --train-dir and --test-dir)"


def test_fgsc_folder_names_need_a_class_map(fgsc_src, tmp_path, capsys):
    (fgsc_src / "train/5").rename(fgsc_src / "train/frigate")
    out = tmp_path / "out"
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(out)]) == 2
    assert "--class-map" in capsys.readouterr().err
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({**{str(i): i for i in range(23)}, "frigate": 5}))
    prepare_fgsc23.main(["--src", str(fgsc_src), "--out", str(out), "--class-map", str(class_map)])
    assert looked_at(open_dataset(out).entries("train")) == [("0/a.jpg", 0), ("5/b.jpg", 5), ("5/c.jpg", 5)]
    class_map.write_text(json.dumps({**{str(i): i for i in range(23)}, "frigate": 23}))  # ids are 0..22
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(tmp_path / "o2"), "--class-map",
                                           str(class_map)]) == 2
    assert "class id 23 is not in 0..22" in capsys.readouterr().err
    class_map.write_text(json.dumps({"0": 0, "5": 5, "22": 22, "frigate": True}))  # JSON true is no class id
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(tmp_path / "o2"), "--class-map",
                                           str(class_map)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


def test_fgsc_refuses_to_test_on_its_training_images(fgsc_src, tmp_path, capsys):
    (tmp_path / "same").symlink_to(fgsc_src / "train")
    for test_dir in (fgsc_src / "train", tmp_path / "same"):
        assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--test-dir", str(test_dir), "--out",
                                               str(tmp_path / "out")]) == 2
        assert "a.jpg and 23 more in both train and test" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_fgsc_refuses_a_class_without_training_images(fgsc_src, tmp_path, capsys):
    """classes.json lists all 23 classes, and every stage refuses one without training
    images: refused here, before anything is written."""
    (fgsc_src / "train/2/x.jpg").unlink()
    paint_scene(fgsc_src / "test/2/t.jpg", (12, 10), {})
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(tmp_path / "out")]) == 2
    assert (f"--train-dir {fgsc_src / 'train'}: class 2 (destroyer) has no training images (its folder 2 is "
            "missing or empty)") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for subset in ("train", "test"):
        shutil.rmtree(fgsc_src / subset / "2")
    (fgsc_src / "map.json").write_text(json.dumps({str(cid): cid for cid in range(23) if cid != 2}))
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(tmp_path / "out"), "--class-map",
                                           str(fgsc_src / "map.json")]) == 2
    assert "class 2 (destroyer) has no training images (no folder of --class-map maps to it)" in one_error(capsys)


def test_fgsc_checks_that_images_decode(fgsc_src, tmp_path, capsys):
    (fgsc_src / "train/5/broken.jpg").write_bytes(b"not a jpeg")
    assert exit_code(prepare_fgsc23.main, ["--src", str(fgsc_src), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read image" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- your own class folders


@pytest.fixture
def class_folders(tmp_path):
    """train/ with three classes (one of them with a stray text file), test/ with two."""
    src = tmp_path / "mine"
    for relpath in ("train/storage_tank/a.jpg", "train/storage_tank/b.png", "train/golf_field/c.jpg",
                    "train/ship/d.jpg", "train/ship/e.jpg", "test/ship/f.jpg", "test/golf_field/g.jpg"):
        paint_scene(src / relpath, (12, 10), {})
    (src / "train/ship/readme.txt").write_text("not an image")
    # Hidden entries are no data: a notebook's checkpoint folder, macOS's files.
    paint_scene(src / "train/.ipynb_checkpoints/x.jpg", (8, 8), {})
    (src / "train/ship/._d.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (src / "train/.DS_Store").write_bytes(b"\x00")
    return src


def entries(info, subset):
    return [(e.relpath, e.class_id) for e in info.entries(subset)]


def test_test_images_that_are_training_images_are_warned_about_by_content_not_name(tmp_path):
    src = tmp_path / "mine"
    for relpath, colour in (("train/ship/0001.jpg", (200, 10, 10)), ("train/dam/0001.jpg", (10, 200, 10)),
                            ("test/ship/0001.jpg", (10, 10, 200)), ("test/dam/0002.jpg", (90, 90, 90))):
        paint_scene(src / relpath, (12, 10), {(0, 0, 6, 5): colour})
    common = ["--train-dir", str(src / "train"), "--test-dir", str(src / "test")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numbered alike in train and test, as many datasets are: no copies
        prepare_folders.main([*common, "--out", str(tmp_path / "a")])
    shutil.copy(src / "train/dam/0001.jpg", src / "test/dam/renamed.jpg")
    with pytest.warns(UserWarning, match="1 test images are copies of a training image of their class .* "
                                         "'renamed.jpg' in 'dam'"):
        prepare_folders.main([*common, "--out", str(tmp_path / "b")])
    # Held out from --train-dir: two copies of an image may fall on either side.
    for index in range(2, 6):
        paint_scene(src / f"train/dam/{index:04d}.jpg", (12, 10), {(0, 0, 6, 5): (40 * index, 40 * index, 10)})
    shutil.copy(src / "train/dam/0001.jpg", src / "train/dam/copy.jpg")
    held_out = ["--train-dir", str(src / "train"), "--test-fraction", "0.5"]
    with pytest.warns(UserWarning) as caught:
        for seed in range(6):  # some seed holds one copy out and keeps the other
            prepare_folders.main([*held_out, "--seed", str(seed), "--out", str(tmp_path / f"held{seed}")])
    copies = [str(warning.message) for warning in caught if "copies of a training image" in str(warning.message)]
    assert copies and all(message.endswith("remove them from --train-dir (the copies of a class may be held out "
                                           "apart)") for message in copies)
    apart = 0
    for seed in range(6):
        tested = {path.name for path in (tmp_path / f"held{seed}" / "test").rglob("*.jpg")}
        apart += len(tested & {"0001.jpg", "copy.jpg"}) == 1
    assert len(copies) == apart
    # An image in two classes, in training or in test: one label is wrong.
    (src / "train/dam/copy.jpg").unlink()
    for relpath, count in (("train/ship/from-dam.jpg", 1), ("test/ship/also-dam.jpg", 1)):
        shutil.copy(src / "train/dam/0002.jpg", src / relpath)
        with pytest.warns(UserWarning, match=f"{count} images are in two or more classes \\(the same bytes\\), e.g. "
                                             f".*dam/0002.jpg and .*ship/.*: one of their labels is wrong"):
            prepare_folders.main([*common, "--out", str(tmp_path / relpath.replace("/", "-")), "--overwrite"])


def test_the_class_table_stays_aligned_with_chinese_names(tmp_path, capsys):
    from tgn.class_names import display_width, padded

    src = tmp_path / "mine"
    for name, count in (("飞机", 3), ("船只", 2), ("storage_tank", 2), ("储油罐", 1)):
        for index in range(count):
            paint_scene(src / "train" / name / f"{index}.jpg", (8, 8), {(0, 0, 4, 4): (40 * index, 9, 9)})
        paint_scene(src / "test" / name / "t.jpg", (8, 8), {(0, 0, 4, 4): (250, 250, 250)})
    prepare_folders.main(["--train-dir", str(src / "train"), "--test-dir", str(src / "test"),
                          "--out", str(tmp_path / "data")])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+(id|\d+|)\s+\S", line)]
    table = [line for line in rows if re.search(r"(train|\d)\s+(test|\d+)(\s+\(.*)?$", line)]
    assert len(table) == 6  # header, four classes, total

    def columns(text):  # as a terminal shows them, counted here by hand: a Chinese character takes two
        return sum(2 if "\u4e00" <= char <= "\u9fff" else 1 for char in text)

    # Every row's test count ends in the same terminal column.
    ends = {columns(re.sub(r"\s+\(\d+ images\)$", "", line)) for line in table}
    assert len(ends) == 1, table
    assert display_width("飞机") == 4 and display_width("e\u0301") == 1 and padded("飞机", 6) == "飞机  "


@pytest.mark.parametrize("link", [None, "symlink"])
def test_class_folders_become_classes_named_after_them(class_folders, tmp_path, capsys, link):
    out = tmp_path / "datasets" / "mine"
    paint_scene(class_folders / "train/ship/more/h.jpg", (8, 8), {})
    (class_folders / "train/golf_field/__pycache__").mkdir()  # no images: nothing to warn of
    paint_scene(class_folders / "train/golf_field/thumbs/@eaDir/t.jpg", (8, 8), {})  # a NAS's, deeper: neither
    # What a NAS or an unzipped macOS archive adds: no class, and no images of one.
    paint_scene(class_folders / "train/@eaDir/thumb.jpg", (8, 8), {})
    paint_scene(class_folders / "train/ship/@eaDir/d.jpg/SYNOFILE_THUMB_M.jpg", (8, 8), {})
    (class_folders / "test/__MACOSX/ship").mkdir(parents=True)
    (class_folders / "test/__MACOSX/ship/._f.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    with pytest.warns(UserWarning) as caught:
        prepare_folders.main(["--train-dir", str(class_folders / "train"), "--test-dir",
                              str(class_folders / "test"), "--out", str(out)] + (["--link", link] if link else []))
    messages = [str(warning.message) for warning in caught]
    assert any(re.search(r"images in folders inside a class folder are not read \(1 such folders, e.g. .*more",
                         m) for m in messages)
    assert any("1 of 3 classes have no test images, e.g. 'storage_tank'" in m for m in messages)
    assert not any("hidden" in m for m in messages)  # a notebook's checkpoints are no class
    info = open_dataset(out)
    assert info.name == "mine" and (out / "anno" / "mine_train.txt").is_file()
    # Ids in the folders' sorted order; underscores become spaces (the CLIP prompt's words).
    assert info.class_names == {0: "golf field", 1: "ship", 2: "storage tank"}
    assert entries(info, "train") == [("0/c.jpg", 0), ("1/d.jpg", 1), ("1/e.jpg", 1), ("2/a.jpg", 2), ("2/b.png", 2)]
    assert entries(info, "test") == [("0/g.jpg", 0), ("1/f.jpg", 1)]
    assert (out / "train/2/b.png").read_bytes() == (class_folders / "train/storage_tank/b.png").read_bytes()
    assert (out / "train/2/b.png").is_symlink() == (link == "symlink")
    printed = capsys.readouterr().out
    assert re.search("ignored 1 files in class folders that are not images, e.g. .*readme.txt", printed)


def test_a_hidden_folder_of_images_is_named_not_skipped_unsaid(class_folders, tmp_path, monkeypatch):
    """A class named '.net' is hidden as .DS_Store is: it is not read, but said so. A hidden
    folder that cannot be listed (a volume's .Spotlight-V100) is passed over."""
    paint_scene(class_folders / "train/.net/n.jpg", (8, 8), {})
    (class_folders / "train/.Spotlight-V100").mkdir()
    iterdir = Path.iterdir

    def system_only(folder):
        if folder.name == ".Spotlight-V100":
            raise PermissionError(13, "Permission denied", str(folder))
        return iterdir(folder)

    monkeypatch.setattr(Path, "iterdir", system_only)
    with pytest.warns(UserWarning, match=r"--train-dir: hidden folders .* 1 of them hold images, e.g. .*\.net"):
        prepare_folders.main(["--train-dir", str(class_folders / "train"), "--test-dir",
                              str(class_folders / "test"), "--out", str(tmp_path / "out")])
    assert set(open_dataset(tmp_path / "out").class_names.values()) == {"golf field", "ship", "storage tank"}


def test_folders_refuse_to_test_on_the_training_images(class_folders, tmp_path, capsys):
    """The same files however they are reached: one folder twice, or through a folder of
    another name (a link here; on macOS and Windows, a spelling in another letter case,
    which file_identity tells by the folder's number). A hard link under another name is a
    copy: warned of, not refused."""
    train = class_folders / "train"
    assert exit_code(prepare_folders.main, ["--train-dir", str(train), "--test-dir", str(train), "--out",
                                            str(tmp_path / "out")]) == 2
    assert "in both train and test" in capsys.readouterr().err and not (tmp_path / "out").exists()
    from data.folders import file_identity

    (tmp_path / "Train").symlink_to(train)
    assert file_identity(tmp_path / "Train" / "ship" / "d.jpg") == file_identity(train / "ship" / "d.jpg")
    copies = tmp_path / "test"
    (copies / "ship").mkdir(parents=True)
    os.link(train / "ship" / "d.jpg", copies / "ship" / "D copy.jpg")
    assert file_identity(copies / "ship" / "D copy.jpg") != file_identity(train / "ship" / "d.jpg")
    with pytest.warns(UserWarning, match="test images are copies of a training image of their class"):
        prepare_folders.main(["--train-dir", str(train), "--test-dir", str(copies), "--out", str(tmp_path / "out")])


def test_folder_names_become_the_clip_prompts_of_the_tail_classes(tmp_path):
    """The hand-off a user of their own dataset depends on: folders -> classes.json ->
    KMDN's split -> CDTG's tail data and its prompts."""
    from CDTG.dataset_split import main as cdtg_split_main
    from CDTG.tail_data import load_tail_classes
    from KMDN.dataset_split import main as split_main

    src = tmp_path / "mine"
    for folder, count in {"ship": 12, "harbor": 10, "storage_tank": 5, "golf__field_": 4, "wind_mill": 3}.items():
        for i in range(count):
            paint_scene(src / folder / f"{i}.jpg", (8, 8), {})
    prepare_folders.main(["--train-dir", str(src), "--test-fraction", "0.2", "--out", str(tmp_path / "data")])
    split_main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "split")])
    cdtg_split_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "cdtg")])
    tail = load_tail_classes(tmp_path / "cdtg")
    assert sorted(tail.prompts) == ["A photo of a golf field", "A photo of a storage tank", "A photo of a wind mill"]
    assert len(tail.samples()) == 4 + 3 + 2  # each class minus its held-out image


def test_each_class_holds_out_its_own_rounded_share(tmp_path):
    """round(fraction x n) of each class, drawn from --seed and the class's folder name: two
    classes of the same file names do not hold out the same names."""
    for number, (folder, count) in enumerate({"a": 13, "b": 10, "c": 10}.items()):
        for i in range(count):  # every image distinct: no copies across classes to warn of
            paint_scene(tmp_path / "src" / folder / f"{i}.jpg", (8, 8), {(0, 0, 2, 2): (i * 9, 80 * number, 0)})
    prepare_folders.main(["--train-dir", str(tmp_path / "src"), "--test-fraction", "0.2", "--out",
                          str(tmp_path / "data")])
    test = open_dataset(tmp_path / "data").entries("test")
    assert [sum(e.class_id == cid for e in test) for cid in range(3)] == [3, 2, 2]  # 2.6 rounds to 3
    held = [{e.relpath.split("/")[1] for e in test if e.class_id == cid} for cid in (1, 2)]
    assert held[0] != held[1]


def test_symlinks_to_a_relative_train_dir_point_to_the_images(tmp_path, monkeypatch):
    for number, folder in enumerate(("a", "b")):
        for i in range(3):
            paint_scene(tmp_path / "src" / folder / f"{i}.jpg", (8, 8), {(0, 0, 2, 2): (i * 60, 120 * number, 0)})
    monkeypatch.chdir(tmp_path)
    prepare_folders.main(["--train-dir", "src", "--test-fraction", "0.5", "--out", "data", "--link", "symlink"])
    info = open_dataset(tmp_path / "data")
    for subset in ("train", "test"):
        for entry in info.entries(subset):
            assert (info.image_root(subset) / entry.relpath).is_symlink()
            load_image(info.image_root(subset) / entry.relpath)


def test_raw_class_folders_given_to_a_stage_point_to_the_preparer(class_folders, tmp_path, capsys):
    """MINE/train (class folders) or MINE (train/<class>/ in it) is to be prepared first;
    the train/ folder of a prepared dataset is to be given as its dataset."""
    from KMDN.dataset_split import main as split_main

    def refusal(data_root):
        assert exit_code(split_main, ["--data-root", str(data_root), "--out", str(tmp_path / "s")]) == 2
        return capsys.readouterr().err

    assert "for a dataset in class folders, run data/prepare_folders.py first" in refusal(class_folders / "train")
    assert (f"run data/prepare_folders.py --train-dir {class_folders / 'train'} --test-dir "
            f"{class_folders / 'test'} --out DATASET first, and pass DATASET") in refusal(class_folders)
    shutil.rmtree(class_folders / "test")
    assert f"--train-dir {class_folders / 'train'} --test-fraction 0.2 --out DATASET first" in refusal(class_folders)
    prepare_folders.main(["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out",
                          str(tmp_path / "data")])
    for folder in ("train", "test", "anno"):
        err = refusal(tmp_path / "data" / folder)
        assert f"it is the {folder}/ folder of the dataset {tmp_path / 'data'}: pass that" in err
        assert "prepare_folders" not in err


def test_a_failure_midway_leaves_no_partial_dataset(class_folders, tmp_path, monkeypatch):
    """A rerun with other flags (here: after a cross-device --link hard) must find --out usable."""
    from data import folders

    place = folders.place

    def place_twice(source, target, link):
        if len(list((tmp_path / "out").rglob("*.*"))) == 2:
            raise folders.UserError("cannot place: Invalid cross-device link")
        place(source, target, link)

    monkeypatch.setattr(folders, "place", place_twice)
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out", str(tmp_path / "out")]
    assert exit_code(prepare_folders.main, argv) == 2
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(folders, "place", place)
    prepare_folders.main(argv)
    assert len(open_dataset(tmp_path / "out").entries("train")) == 3


def test_held_out_test_images_depend_on_the_seed_alone(tmp_path):
    src = tmp_path / "images"
    counts = {"a": 10, "b": 5, "c": 2, "d": 1}
    for folder, count in counts.items():
        for i in range(count):
            paint_scene(src / folder / f"{i}.jpg", (8, 8), {})

    def split(seed, name):
        prepare_folders.main(["--train-dir", str(src), "--test-fraction", "0.1", "--seed", str(seed),
                              "--out", str(tmp_path / name)])
        info = open_dataset(tmp_path / name)
        return set(entries(info, "train")), set(entries(info, "test"))

    train, test = split(0, "s0")
    assert (train, test) == split(0, "again") and (train, test) != split(1, "s1")
    assert not train & test
    assert {relpath for relpath, _ in train | test} == {f"{cid}/{i}.jpg" for cid, (folder, count) in
                                                        enumerate(counts.items()) for i in range(count)}
    # round(0.1 n) held out, at least one (every class is measured), never a class's last image.
    assert [sum(cid == c for _, c in test) for cid in range(4)] == [1, 1, 1, 0]
    # A class's choice depends on its own images: a new class (id 0, before the others) leaves
    # every other class's held-out images as they were.
    for i in range(6):
        paint_scene(src / "0_new" / f"{i}.jpg", (8, 8), {})
    _, test_with_new_class = split(0, "more")
    assert {(f"{cid + 1}/" + relpath.split("/")[1]) for relpath, cid in test} <= {
        relpath for relpath, _ in test_with_new_class}


def test_overwrite_and_failures_never_reach_beyond_the_dataset(class_folders, tmp_path, monkeypatch):
    """--overwrite unlinks a symlinked train/ instead of emptying the folder it points to; a
    failure keeps an --out folder the user made; a file-name clash is found before --overwrite
    removes the dataset there."""
    out = tmp_path / "out"
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out", str(out)]
    prepare_folders.main(argv)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    (elsewhere / "keep" / "precious.txt").write_text("mine")
    shutil.rmtree(out / "train")
    (out / "train").symlink_to(elsewhere, target_is_directory=True)
    prepare_folders.main([*argv, "--overwrite"])
    assert (elsewhere / "keep" / "precious.txt").read_text() == "mine"
    assert not (out / "train").is_symlink() and len(open_dataset(out).entries("train")) == 3

    from data import folders

    def cross_device(source, target, link):
        raise folders.UserError("cannot place: Invalid cross-device link")

    monkeypatch.setattr(folders, "place", cross_device)
    made = tmp_path / "made-by-the-user"
    made.mkdir()
    assert exit_code(prepare_folders.main, [*argv[:-1], str(made)]) == 2
    assert made.is_dir() and not any(made.iterdir())


def test_fgsc_file_name_clash_is_found_before_overwrite_removes_anything(fgsc_src, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_fgsc23.main(["--src", str(fgsc_src), "--out", str(out)])
    paint_scene(fgsc_src / "train/zero/a.jpg", (12, 10), {})  # also class 0, also a.jpg
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({**{str(i): i for i in range(23)}, "zero": 0}))
    argv = ["--src", str(fgsc_src), "--out", str(out), "--class-map", str(class_map), "--overwrite"]
    assert exit_code(prepare_fgsc23.main, argv) == 2
    assert "would both be train/0/a.jpg" in capsys.readouterr().err
    assert len(open_dataset(out).entries("train")) == 3 + 21  # the earlier dataset is still there
    (fgsc_src / "train/zero/a.jpg").rename(fgsc_src / "train/zero/A.JPG")  # one file where case is ignored
    assert exit_code(prepare_fgsc23.main, argv) == 2
    assert "would both be train/0/A.JPG on macOS and Windows" in capsys.readouterr().err


def test_image_names_one_where_case_is_ignored_are_warned_of(class_folders, tmp_path):
    """Kept on Linux, but the prepared dataset would lose one of them on macOS or Windows."""
    paint_scene(class_folders / "train/ship/D.JPG", (12, 10), {})
    with pytest.warns(UserWarning, match="1 image names differ from another in their class folder only in letter "
                                         "case or Unicode form \\(e.g. 'D.JPG' and 'd.jpg'\\)"):
        prepare_folders.main(["--train-dir", str(class_folders / "train"), "--test-dir",
                              str(class_folders / "test"), "--out", str(tmp_path / "data")])
    assert len([e for e in open_dataset(tmp_path / "data").entries("train") if e.class_id == 1]) == 3


def test_class_names_and_numbered_folders(class_folders, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"golf_field": "golf course"}))
    common = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5"]
    prepare_folders.main([*common, "--class-names", str(names), "--out", str(tmp_path / "a"), "--dataset", "Mine-1"])
    info = open_dataset(tmp_path / "a")
    assert info.name == "Mine-1" and info.class_names == {0: "golf course", 1: "ship", 2: "storage tank"}
    numbered = tmp_path / "numbered"
    for folder in ("10", "2", "1"):
        paint_scene(numbered / folder / "x.jpg", (8, 8), {})
        paint_scene(numbered / folder / "y.jpg", (8, 8), {})
    with pytest.warns(UserWarning, match="class folders are numbers"):
        prepare_folders.main(["--train-dir", str(numbered), "--test-fraction", "0.5", "--out", str(tmp_path / "n")])
    assert open_dataset(tmp_path / "n").class_names == {0: "1", 1: "2", 2: "10"}  # numeric order


@pytest.mark.parametrize("change, argv, message", [
    ("empty class", [], "class folder .*empty_class holds no images"),
    ("stray test class", ["--test-dir", "{src}/test"], "folder .*planes is not a class of --train-dir"),
    ("respelled test classes", ["--test-dir", "{src}/test"],
     r"folder .*Storage-Tank is not a class of --train-dir .* \(is it 'storage_tank'\?\) \(1 more: zebras\)$"),
    ("none", ["--test-dir", "{src}/test", "--test-fraction", "0.2"], "either --test-dir or --test-fraction"),
    ("none", ["--test-fraction", "1.5"], "--test-fraction: 1.5 must be between 0 and 1"),
    ("none", ["--test-fraction", "0.5", "--class-names", "{src}/names.json"], "'tank' is not a class folder"),
    ("none", ["--test-fraction", "0.5", "--class-names", "{src}/two_lines.json"],
     r"the class name 'large\\nship' holds a control character \(a line break, a tab\); write it on one line"),
    ("none", ["--test-fraction", "0.5", "--class-names", "{src}/empty.json"],
     "the class name of 'ship' is empty; give it a name, or leave the folder out of the file"),
    ("same names", ["--test-fraction", "0.5"], "both have the class name 'golf field'"),
    ("spelled apart", ["--test-fraction", "0.5"], "'golf-field' and 'golf_field' have the class names 'golf-field' and 'golf field'"),
    ("none", ["--test-fraction", "0.2", "--dataset", "my data"], "--dataset 'my data': use letters"),
    ("single images", ["--test-fraction", "0.5"], "no class has a test image"),
    ("same letters", ["--test-fraction", "0.5"], "'Ship' and 'ship' have the class names 'Ship' and 'ship'"),
    ("truncated", ["--test-fraction", "0.5"], "cannot read image .*t.jpg: image file is truncated"),
    ("truncated twice", ["--test-fraction", "0.5"], r"t.jpg: image file is truncated .*\(1 more unreadable images: .*/u.jpg\)$"),
    ("truncated and not empty", ["--test-fraction", "0.5"], "--out .* is not empty; pass --overwrite"),
    ("space in --out", ["--test-fraction", "0.5"], r"\(--out's folder name\) 'my data'.*pass --dataset NAME"),
    ("parent folder", ["--test-fraction", "0.5"], "holds folders but no images; is --train-dir one level above"),
    ("broken link", ["--test-fraction", "0.5"],
     r"--train-dir: 1 links to images lead nowhere \(their targets moved or were deleted\), e.g. .*ship/z.jpg -> "),
    ("class of broken links", ["--test-fraction", "0.5"], "2 links to images lead nowhere"),
    ("class of gifs", ["--test-fraction", "0.5"],
     r"class folder .*dam holds no images of the types read \(1 of other types, e.g. a.gif\): convert them"),
])
def test_class_folder_mistakes_are_one_line_errors(class_folders, tmp_path, capsys, change, argv, message):
    src = class_folders
    if change == "empty class":
        (src / "train" / "empty_class").mkdir()
        argv = ["--test-fraction", "0.2"]
    elif change == "stray test class":
        paint_scene(src / "test/planes/p.jpg", (8, 8), {})
    elif change == "respelled test classes":
        for folder in ("Storage-Tank", "zebras"):
            paint_scene(src / "test" / folder / "p.jpg", (8, 8), {})
    elif change == "same names":
        paint_scene(src / "train/golf field/z.jpg", (8, 8), {})
    elif change == "spelled apart":  # one class to the reports and checkpoints, which compare names so
        paint_scene(src / "train/golf-field/z.jpg", (8, 8), {})
    elif change == "single images":
        for path in (src / "train/ship/e.jpg", src / "train/storage_tank/b.png"):
            path.unlink()
    elif change == "same letters":
        paint_scene(src / "train/Ship/z.jpg", (8, 8), {})
    elif change == "broken link":  # a tree of links to images since moved: "not images" said nothing useful
        (src / "train/ship/z.jpg").symlink_to(tmp_path / "moved" / "z.jpg")
    elif change == "class of broken links":  # "holds no images" was wrong: it holds links to them
        (src / "train/dam").mkdir()
        for name in ("y.jpg", "z.png"):
            (src / "train/dam" / name).symlink_to(tmp_path / "moved" / name)
    elif change == "class of gifs":  # "holds no images" was wrong: it holds images, of a type not read
        (src / "train/dam").mkdir()
        Image.new("RGB", (8, 8)).save(src / "train/dam/a.gif")
    elif change.startswith("truncated"):
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(src / "train/ship/t.jpg", quality=90)
        data = (src / "train/ship/t.jpg").read_bytes()
        (src / "train/ship/t.jpg").write_bytes(data[:len(data) * 7 // 10])  # a header that verify() accepts
        if change.endswith("twice"):
            (src / "train/ship/u.jpg").write_bytes(data[:len(data) * 7 // 10])
        if change.endswith("not empty"):  # --out's mistakes come before minutes of decoding
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "classes.json").write_text("{}")
    (src / "names.json").write_text(json.dumps({"tank": "tank"}))
    (src / "two_lines.json").write_text(json.dumps({"ship": "large\nship"}))
    (src / "empty.json").write_text(json.dumps({"ship": " "}))
    argv = [arg.format(src=src) for arg in argv]
    out = tmp_path / ("my data" if change == "space in --out" else "out")
    train_dir = src if change == "parent folder" else src / "train"
    assert exit_code(prepare_folders.main, ["--train-dir", str(train_dir), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # besides progress bars
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in err, err
    assert not out.exists() or change.endswith("not empty")


# ---------------------------------------------------------------- demo


def read_tree(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(Path(root).rglob("*")) if path.is_file()}


def test_make_demo_is_deterministic_long_tailed_and_distinct(tmp_path):
    make_demo.main(["--out", str(tmp_path / "a"), "--seed", "3"])
    make_demo.main(["--out", str(tmp_path / "b"), "--seed", "3"])
    make_demo.main(["--out", str(tmp_path / "c"), "--seed", "4"])
    first = read_tree(tmp_path / "a")
    assert first == read_tree(tmp_path / "b")
    assert first != read_tree(tmp_path / "c")

    info = open_dataset(tmp_path / "a")
    assert info.name == "DEMO" and len(info.class_names) >= 8
    counts = {subset: np.bincount([e.class_id for e in info.entries(subset)]) for subset in ("train", "test")}
    assert counts["train"].tolist() == [40, 16, 8, 12, 90, 60, 24, 120, 10]  # 120 down to 8, as README says
    assert set(counts["test"]) == {20}
    assert Image.open(info.image_root("train") / info.entries("train")[0].relpath).size == (32, 32)
    # Test images are drawn apart from the training images, not copies of them.
    contents = {subset: {(info.image_root(subset) / e.relpath).read_bytes() for e in info.entries(subset)}
                for subset in ("train", "test")}
    assert not contents["train"] & contents["test"]

    # Distinct classes: even a nearest-class-mean on 4 x 4 thumbnails beats chance (1/9) by far.
    def features(subset):
        entries = info.entries(subset)
        thumbs = [np.asarray(Image.open(info.image_root(subset) / e.relpath).resize((4, 4), Image.BOX), np.float32)
                  for e in entries]
        return np.stack(thumbs).reshape(len(entries), -1), np.array([e.class_id for e in entries])

    train_x, train_y = features("train")
    test_x, test_y = features("test")
    means = np.stack([train_x[train_y == cid].mean(0) for cid in sorted(info.class_names)])
    predicted = ((test_x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test_y).mean() > 0.6


def test_demo_writes_a_relative_out_in_the_callers_folder(tmp_path, monkeypatch):
    import subprocess

    import data.demo as demo

    run, stages = subprocess.run, []

    def first_stage_only(command, **kwargs):  # the demo data; the later stages are not needed here
        stages.append(command)
        return run(command, **kwargs) if len(stages) == 1 else subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(demo.subprocess, "run", first_stage_only)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        demo.main(["--out", "relative-demo"])
    assert (tmp_path / "relative-demo" / "data" / "classes.json").is_file()
    assert (tmp_path / "relative-demo" / "tiny_clip.pt").is_file() and not (ROOT / "relative-demo").exists()


def test_demo_refuses_a_bad_device_and_size_before_writing(tmp_path, capsys):
    import data.demo as demo

    for main, argv, message in (
            (demo.main, ["--device", "foo"], "--device foo: not a device"),
            (make_demo.main, ["--size", "4"], "--size must be from 8 to 512 pixels, got 4"),
            (make_demo.main, ["--size", "100000"], "--size must be from 8 to 512 pixels, got 100000")):
        assert exit_code(main, [*argv, "--out", str(tmp_path / "demo")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0]
        assert not (tmp_path / "demo").exists()


def test_demo_output_takes_an_empty_folder_and_replaces_only_its_own_run(tmp_path, capsys):
    from data.demo import clear_output

    out = tmp_path / "demo"
    out.mkdir()
    clear_output(out, overwrite=False)  # made by the user, empty: used as it is
    (out / "kmdn" / "head").mkdir(parents=True)
    (out / "tiny_clip.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="pass --overwrite"):
        clear_output(out, overwrite=False)
    clear_output(out, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())
    (out / "kmdn").mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="did not write .thesis.tex"):
        clear_output(out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "mine" and (out / "kmdn").is_dir()


def test_a_test_folder_matches_its_class_whatever_the_unicode_form_of_its_name(tmp_path):
    """macOS stores accented names decomposed (NFD), Linux keeps what it is given."""
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    for folder, subset in ((composed, "train"), ("port", "train"), (decomposed, "test"), ("port", "test")):
        for i in range(2):
            paint_scene(tmp_path / subset / folder / f"{i}.jpg", (8, 8), {})
    prepare_folders.main(["--train-dir", str(tmp_path / "train"), "--test-dir", str(tmp_path / "test"),
                          "--out", str(tmp_path / "data")])
    info = open_dataset(tmp_path / "data")
    assert sorted(info.class_names.values()) == [composed, "port"]
    assert len(info.entries("test")) == 4


def test_images_of_other_types_are_named_and_webp_is_read(class_folders, tmp_path, capsys):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(class_folders / "train/ship/w.webp")
    Image.new("RGB", (8, 8)).save(class_folders / "train/ship/anim.gif")
    (class_folders / "train/notes.txt").write_text("beside the class folders")
    (class_folders / "train/ship/labels.pdf").write_bytes(b"%PDF-1.4")  # PIL writes PDFs: still no image
    with pytest.warns(UserWarning, match=r"left out 1 images of types not read \(.gif\), e.g. .*anim.gif"):
        prepare_folders.main(["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5",
                              "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert re.search("ignored 1 files beside the class folders of .*train, e.g. .*notes.txt", printed)
    assert "ignored 2 files in class folders that are not images, e.g. " in printed  # readme.txt, labels.pdf
    listed = [relpath for subset in ("train", "test") for relpath, _ in entries(open_dataset(tmp_path / "out"), subset)]
    assert "1/w.webp" in listed and not any(name.endswith(".gif") for name in listed)


def test_folder_dataset_images_keep_the_pixel_guard_that_training_keeps(class_folders, dota_src, tmp_path, capsys,
                                                                        monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is not None  # importing the preparers lifts it nowhere
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # the 12 x 10 images are then past twice the limit
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out", str(tmp_path / "out")]
    assert exit_code(prepare_folders.main, argv) == 2
    assert re.search(r"error: cannot read image .*exceeds limit", capsys.readouterr().err)
    # Past twice the limit too, scenes are cropped; their chips, within it, written.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    prepare_dota.main(["--src", str(dota_src), "--out", str(tmp_path / "dota"), "--workers", "1"])
    assert len(shown(open_dataset(tmp_path / "dota").entries("train"))) == 3
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_names_that_are_not_utf8_are_refused_before_anything_is_written(class_folders, tmp_path, capsys):
    latin1 = os.fsdecode(b"caf\xe9")  # an archive's Latin-1 bytes, kept as they are by Linux
    for bad in (class_folders / "train/ship" / f"{latin1}.jpg", class_folders / "train" / latin1 / "x.jpg"):
        paint_scene(bad, (8, 8), {})
        argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out", str(tmp_path / "out")]
        assert exit_code(prepare_folders.main, argv) == 2
        err = capsys.readouterr().err
        assert re.search(r"error: --train-dir: the name of .*caf\\udce9.* is not UTF-8 text; rename it", err), err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
        shutil.rmtree(bad.parent) if bad.parent.name == latin1 else bad.unlink()


def test_names_with_line_breaks_are_refused_and_other_separators_pass(class_folders, tmp_path, capsys):
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5", "--out", str(tmp_path / "out")]
    bad = class_folders / "train/ship" / "a\nb.jpg"  # no line of an annotation file can hold it
    paint_scene(bad, (8, 8), {})
    assert exit_code(prepare_folders.main, argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --train-dir: the name of .*a\\nb.jpg.* holds a line break; rename it", err), err
    assert not (tmp_path / "out").exists()
    bad.unlink()
    paint_scene(class_folders / "train/ship" / "x\u2028y.jpg", (8, 8), {})  # a Unicode line separator: fine
    prepare_folders.main(argv)
    listed = [entry.relpath for subset in ("train", "test") for entry in open_dataset(tmp_path / "out").entries(subset)]
    assert sum("x\u2028y.jpg" in relpath for relpath in listed) == 1


def test_16_bit_images_of_fewer_bits_are_warned_of(class_folders, tmp_path):
    def grey16(path, peak):
        Image.fromarray(np.linspace(0, peak, 120, dtype=np.uint16).reshape(10, 12)).save(path)

    grey16(class_folders / "train/ship/full.png", 65535)  # the whole 16-bit range: loads as it should
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_folders.main([*argv, "--out", str(tmp_path / "full")])
    assert not [w for w in caught if "16-bit" in str(w.message)]
    grey16(class_folders / "train/ship/twelve.png", 4095)  # a 12-bit sensor's values
    with pytest.warns(UserWarning, match=r"1 16-bit images use at most 14 of their 16 bits \(e.g. .*twelve.png, "
                                         r"brightest value 4095\): .* load dark \(brightest 16 of 255\)"):
        prepare_folders.main([*argv, "--out", str(tmp_path / "twelve")])


def rgb16_png(path, pixels):
    """A 16-bit RGB PNG (PIL writes none): (H, W, 3) uint16 pixels; (H, W, 4) for RGBA."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, bands = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[bands], 0, 0, 0)  # colour type: RGB, RGBA
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_colour_images_of_fewer_bits_are_warned_of(class_folders, tmp_path):
    """PIL opens 16-bit colour as the high byte of each value: 12-bit data loads as 0..15."""
    ramp = np.linspace(0, 1, 10 * 12 * 3).reshape(10, 12, 3)
    rgb16_png(class_folders / "train/ship/full.png", (ramp * 65535).astype(np.uint16))
    argv = ["--train-dir", str(class_folders / "train"), "--test-fraction", "0.5"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_folders.main([*argv, "--out", str(tmp_path / "full")])
    assert not [w for w in caught if "16-bit" in str(w.message)]
    rgb16_png(class_folders / "train/ship/twelve.png", (ramp * 4095).astype(np.uint16))
    assert np.asarray(load_image(class_folders / "train/ship/twelve.png", 12)).max() == 15  # what training reads
    with pytest.warns(UserWarning, match=r"1 16-bit images use at most 14 of their 16 bits \(e.g. .*twelve.png, "
                                         r".* load dark \(brightest 15 of 255\)"):
        prepare_folders.main([*argv, "--out", str(tmp_path / "twelve")])
    # With an opaque alpha channel, at 65535 and dropped on loading: the colour is measured.
    opaque = np.full((10, 12, 1), 65535, dtype=np.uint16)
    (class_folders / "train/ship/twelve.png").unlink()
    rgb16_png(class_folders / "train/ship/alpha.png", np.concatenate([(ramp * 4095).astype(np.uint16), opaque], 2))
    assert np.asarray(load_image(class_folders / "train/ship/alpha.png", 12)).max() == 15
    with pytest.warns(UserWarning, match=r"1 16-bit images use at most 14 of their 16 bits \(e.g. .*alpha.png, "
                                         r".* load dark \(brightest 15 of 255\)"):
        prepare_folders.main([*argv, "--out", str(tmp_path / "alpha")])


@pytest.mark.parametrize("subset", ["train", "test"])
def test_two_folders_of_one_name_in_two_unicode_forms_are_refused(tmp_path, capsys, subset):
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for folder, where in ((composed, "train"), ("port", "train"), (composed, "test"), ("port", "test"),
                          (decomposed, subset)):
        for i in range(2):
            paint_scene(tmp_path / where / folder / f"{folder == decomposed}{i}.jpg", (8, 8), {})
    argv = ["--train-dir", str(tmp_path / "train"), "--test-dir", str(tmp_path / "test"), "--out", str(tmp_path / "d")]
    assert exit_code(prepare_folders.main, argv) == 2
    err = capsys.readouterr().err
    assert re.search(f"error: --{subset}-dir: folders .* are one name in two Unicode forms", err), err
    assert not (tmp_path / "d").exists()


def test_class_names_match_folders_in_either_unicode_form(tmp_path):
    import unicodedata

    for folder in (unicodedata.normalize("NFD", "café"), "port"):  # as macOS stores it
        for i in range(2):
            paint_scene(tmp_path / "train" / folder / f"{i}.jpg", (8, 8), {})
    (tmp_path / "names.json").write_text(json.dumps({unicodedata.normalize("NFC", "café"): "coffee shop"}))
    prepare_folders.main(["--train-dir", str(tmp_path / "train"), "--test-fraction", "0.5", "--class-names",
                          str(tmp_path / "names.json"), "--out", str(tmp_path / "d")])
    assert open_dataset(tmp_path / "d").class_names == {0: "coffee shop", 1: "port"}


def test_the_same_folders_give_the_same_classes_and_test_images_on_every_system(tmp_path, monkeypatch):
    """macOS stores names decomposed (NFD) and Windows sorts paths case aside: neither may
    change the class ids, the class names or which images --test-fraction holds out."""
    import unicodedata
    from pathlib import PurePosixPath

    def layout(form, root):
        for folder in ("église", "zone", "Ébène"):
            for name in ("b.png", "A.png", "é1.png", "c.png", "D.png", "e2.png"):
                paint_scene(root / unicodedata.normalize(form, folder) / unicodedata.normalize(form, name), (8, 8), {})
        return root

    def prepared(root, out):
        prepare_folders.main(["--train-dir", str(root), "--test-fraction", "0.5", "--seed", "3", "--out", str(out)])
        info = open_dataset(out)
        tests = sorted(unicodedata.normalize("NFC", e.relpath) for e in info.entries("test"))
        return info.class_names, tests

    linux = prepared(layout("NFC", tmp_path / "nfc"), tmp_path / "a")
    assert linux[0] == {0: "zone", 1: "Ébène", 2: "église"}  # code points: accented initials after z
    assert prepared(layout("NFD", tmp_path / "nfd"), tmp_path / "b") == linux  # as macOS stores them

    def sorted_case_aside(self, other):  # how Windows' paths compare
        return (str(self).casefold(), str(self)) < (str(other).casefold(), str(other))

    monkeypatch.setattr(PurePosixPath, "__lt__", sorted_case_aside)
    assert prepared(tmp_path / "nfc", tmp_path / "c") == linux


def test_context_stays_within_the_scene_and_min_size_keeps_its_own_size(tmp_path):
    """Catches the context padding not clipped to the scene (PIL pads the chip with black),
    and an object exactly --min-size wide skipped ('smaller than --min-size')."""
    assert clip_box(pad_box((2, 2, 10, 10), 0.5), 12, 12) == (0, 0, 12, 12)
    assert clip_box(pad_box((4, 4, 8, 8), 0.25), 12, 12) == (3, 3, 9, 9)
    (tmp_path / "train" / "1").mkdir(parents=True)
    scene = Image.new("RGB", (20, 20), (200, 10, 10))
    image = SourceImage(tmp_path / "s.jpg", "s", "train", (ChipObject(0, 1, (2, 2, 6, 10)),))  # 4 px wide
    entries, skipped = [], Counter()
    _crop_objects(scene, image, CropOptions(out=tmp_path, min_size=4), entries, skipped)
    assert len(entries) == 1 and not skipped
