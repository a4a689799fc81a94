"""Head/tail split: counts, ranking, ties, threshold edges, nothing copied."""
import json
import warnings
from pathlib import Path

import pytest

from conftest import write_dataset
from KMDN.dataset_split import main as split_main
from tgn.data import open_dataset
from tgn.errors import UserError
from tgn.split import check_split_matches, head_count, load_split, rank_classes


def test_rank_breaks_ties_by_class_id():
    assert rank_classes({3: 5, 1: 5, 2: 9, 0: 1}) == [2, 1, 3, 0]


def test_the_split_records_the_classes_ranked_by_training_count(tmp_path):
    """split.json's ranking (and the table dataset_split.py prints) is by training count,
    not by id: head then tail, each in count order."""
    data = write_dataset(tmp_path / "data", {0: 3, 1: 12, 2: 10, 3: 4, 4: 8}, {0: 1, 1: 2, 2: 3, 3: 4, 4: 5})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    record = json.loads((tmp_path / "split" / "split.json").read_text())
    assert record["ranking"] == [1, 2, 4, 3, 0] and load_split(tmp_path / "split").ranking == [1, 2, 4, 3, 0]
    split = load_split(tmp_path / "split")
    assert split.train_counts == {0: 3, 1: 12, 2: 10, 3: 4, 4: 8}
    assert split.test_counts == {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}


@pytest.mark.parametrize("classes, percent, expected", [
    (20, 40, 8),    # DIOR: 8 head classes
    (23, 40, 9),    # FGSC-23: floor(9.2)
    (15, 40, 6),    # DOTA
    (15, 33, 4),    # the paper's alternative threshold
    (2, 40, 1),     # never an empty group
    (3, 99, 2),
    (5, 1, 1),
    (375, 18.4, 69),  # 375 * 18.4 / 100 is 68.999... in floating point
    (500, 64.6, 323),
])
def test_head_count(classes, percent, expected):
    assert head_count(classes, percent) == expected


@pytest.mark.parametrize("classes, percent", [(1, 40), (5, 0), (5, 100)])
def test_head_count_rejects_impossible_splits(classes, percent):
    with pytest.raises(UserError):
        head_count(classes, percent)


def test_split_writes_lists_without_copying(toy_data, tmp_path):
    out = tmp_path / "split"
    files_before = sorted(p for p in tmp_path.rglob("*") if p.suffix == ".jpg")
    split_main(["--data-root", str(toy_data), "--out", str(out)])
    files_after = sorted(p for p in tmp_path.rglob("*") if p.suffix == ".jpg")
    assert files_before == files_after

    split = load_split(out)
    assert split.head == [0, 1] and split.tail == [2, 3, 4]
    assert split.train_counts == {0: 12, 1: 10, 2: 8, 3: 4, 4: 3}
    assert split.label_of("tail") == {2: 0, 3: 1, 4: 2}
    tail_train = split.entries("tail", "train")
    assert len(tail_train) == 15 and {e.class_id for e in tail_train} == {2, 3, 4}
    assert len(split.entries("head", "test")) == 6
    for path, _ in split.samples("tail", "train"):
        assert path.startswith(str(toy_data.resolve() / "train"))

    record = json.loads((out / "split.json").read_text())
    groups = {c["id"]: c["group"] for c in record["classes"]}
    assert groups == {0: "head", 1: "head", 2: "tail", 3: "tail", 4: "tail"}
    assert record["ranking"] == [0, 1, 2, 3, 4]


def test_split_refuses_to_overwrite(toy_data, tmp_path):
    out = tmp_path / "split"
    split_main(["--data-root", str(toy_data), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        split_main(["--data-root", str(toy_data), "--out", str(out)])
    assert exit_info.value.code == 2
    split_main(["--data-root", str(toy_data), "--out", str(out), "--threshold", "60", "--overwrite"])
    assert load_split(out).head == [0, 1, 2]


def test_split_from_another_dataset_is_refused(toy_data, tmp_path):
    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    other = write_dataset(tmp_path / "other", {0: 12, 1: 10, 2: 8, 3: 4, 4: 2})
    with pytest.raises(UserError, match="another dataset"):
        check_split_matches(load_split(tmp_path / "split"), open_dataset(other))


def test_a_split_of_data_prepared_again_with_the_same_counts_is_refused(toy_data, tmp_path, capsys):
    """Counts and names alike, other files: a test image swapped (a preparer run with another
    seed), or a training image renamed. KMDN picked best.pth on the split's test list while
    Classification scored DATA's."""
    from KMDN.UModel import main as umodel_main

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    info = open_dataset(toy_data)
    check_split_matches(load_split(tmp_path / "split"), info)
    test_anno, train_anno = (toy_data / "anno" / f"TOY_{subset}.txt" for subset in ("test", "train"))
    original = test_anno.read_text()
    (toy_data / "test" / "3" / "img 0.jpg").rename(toy_data / "test" / "3" / "swapped.jpg")
    test_anno.write_text(original.replace("3/img 0.jpg 3", "3/swapped.jpg 3"))
    with pytest.raises(SystemExit):
        umodel_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "kmdn"), "--epochs", "1"])
    message = capsys.readouterr().err
    assert message.startswith(f"error: split {tmp_path / 'split'} lists other test images than {test_anno} (1 of its "
                              "images is no longer listed there, 1 listed there is new to it): DATA changed since")
    assert not (tmp_path / "kmdn").exists()
    train_anno.write_text(train_anno.read_text().replace("4/img 2.jpg 4", "4/img 0.jpg 4"))  # a copy named twice
    with pytest.raises(UserError, match="lists other train images than"):
        check_split_matches(load_split(tmp_path / "split"), open_dataset(toy_data))
    lines = original.splitlines(keepends=True)
    test_anno.write_text("".join(reversed(lines)))  # the order does not matter
    train_anno.write_text(train_anno.read_text().replace("4/img 0.jpg 4\n", "4/img 2.jpg 4\n", 1))
    (toy_data / "test" / "3" / "swapped.jpg").rename(toy_data / "test" / "3" / "img 0.jpg")
    check_split_matches(load_split(tmp_path / "split"), open_dataset(toy_data))


def test_a_cut_among_classes_of_equal_counts_is_warned_about(tmp_path):
    """The folder order, not the data, then decides which of them are head."""
    data = write_dataset(tmp_path / "data", {0: 9, 1: 5, 2: 5, 3: 5, 4: 2})
    with pytest.warns(UserWarning, match="classes 1, 2, 3 have 5 training images each and the head/tail cut falls "
                                         "among them: the lower class ids went to head"):
        split_main(["--data-root", str(data), "--out", str(tmp_path / "tied")])
    assert load_split(tmp_path / "tied").head == [0, 1]
    untied = write_dataset(tmp_path / "untied", {0: 9, 1: 6, 2: 5, 3: 5, 4: 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ties within a group are no matter
        split_main(["--data-root", str(untied), "--out", str(tmp_path / "split")])


def test_class_without_training_images_is_an_error(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {0: 5, 1: 0, 2: 3})
    with pytest.raises(SystemExit) as exit_info:
        split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: class 1") and "\n" not in message


def test_a_group_of_one_class_and_a_fraction_for_a_percentage_are_warned(tmp_path):
    data = write_dataset(tmp_path / "data", {0: 6, 1: 4, 2: 3, 3: 2, 4: 1})
    with pytest.warns(UserWarning) as caught:
        split_main(["--data-root", str(data), "--out", str(tmp_path / "a"), "--threshold", "0.4"])  # meant 40
    messages = [str(warning.message) for warning in caught]
    assert "--threshold is a percentage: 0.4 means 0.4% of the classes (for 40%, pass 40)" in messages
    assert ("the head group has one class: cross-entropy over one class is 0, so UModel.py trains nothing; a "
            "--threshold that leaves 2 classes in each group avoids it") in messages
    with pytest.warns(UserWarning) as caught:
        split_main(["--data-root", str(data), "--out", str(tmp_path / "b"), "--threshold", "80"])
    assert [str(warning.message) for warning in caught] == [
        "the tail group has one class: cross-entropy over one class is 0, so RModel.py trains nothing, and CDTG's "
        "classifier and CLIP losses are 0; a --threshold that leaves 2 classes in each group avoids it"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split_main(["--data-root", str(data), "--out", str(tmp_path / "c")])  # 2 head, 3 tail
    assert not caught, [str(w.message) for w in caught]
    three = write_dataset(tmp_path / "three", {0: 6, 1: 4, 2: 3})
    with pytest.warns(UserWarning, match=r"head group has one class: .* trains nothing$"):  # no threshold helps
        split_main(["--data-root", str(three), "--out", str(tmp_path / "d")])


def test_missing_data_root_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        split_main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "split")])
    assert capsys.readouterr().err.strip() == f"error: dataset folder not found: {tmp_path / 'nowhere'}"


def test_a_moved_dataset_is_found_with_data_root(toy_data, tmp_path):
    from CDTG.dataset_split import main as cdtg_split_main
    from CDTG.tail_data import load_tail_classes

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    cdtg_split_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "tail")])
    moved = toy_data.rename(tmp_path / "moved")
    for load in (lambda **kw: load_split(tmp_path / "split", **kw),
                 lambda **kw: load_tail_classes(tmp_path / "tail", **kw)):
        with pytest.raises(UserError, match=rf"dataset folder not found: {toy_data} \(recorded in .*pass --data-root"):
            load()
        assert load(data_root=moved).data_root == moved


def test_a_threshold_a_hair_below_100_still_leaves_a_tail():
    """The 1e-9 that keeps 20 * 40 / 100 from flooring to 7 would lift 2 * 99.9999999999 / 100
    to 2: the clamp keeps a tail."""
    from tgn.split import head_count

    assert head_count(2, 99.9999999999) == 1


def test_official_weights_accept_a_group_with_tied_training_counts():
    """Tied counts (the split breaks ties by class id) are in the official order; only a
    rising count is refused."""
    from tgn.errors import UserError
    from tgn.split import check_official_order

    def check(counts):
        ids = list(range(len(counts)))
        check_official_order("official.pth", "the listing", ids, counts, [f"class {cid}" for cid in ids])

    check([8, 4, 4])  # ties: the order the split writes
    check([12, 12])
    with pytest.raises(UserError, match="is an official file"):
        check([4, 8, 4])


def test_official_head_weights_need_dior_ranked_as_the_official_scripts_rank_it(capsys):
    """DIOR prepared otherwise (other image lists, --min-size) may rank its head classes
    otherwise: the official M_H's outputs would then name other classes, silently."""
    from tgn.class_names import DIOR_CLASSES
    from tgn.errors import UserError
    from tgn.split import OFFICIAL_DIOR_HEAD, check_official_order

    counts = [9, 8, 7, 6, 5, 4, 3, 2]
    check_official_order("M_H.pth", "the split's head group", OFFICIAL_DIOR_HEAD, counts,
                         [DIOR_CLASSES[cid].replace(" ", "") for cid in OFFICIAL_DIOR_HEAD])  # the XML's spelling
    assert capsys.readouterr().out == ""  # checked: nothing assumed
    swapped = [13, 18, 0, 15, 16, 2, 11, 19]
    with pytest.raises(UserError, match="its outputs are DIOR's head classes as the official scripts rank them "
                                        "\\(13, 18, 15, 0, 16, 2, 11, 19\\), but this DIOR's training counts rank them "
                                        "13, 18, 0, 15, 16, 2, 11, 19 \\(prepared otherwise"):
        check_official_order("M_H.pth", "the split's head group", swapped, counts, [DIOR_CLASSES[c] for c in swapped])
    # Another dataset's classes under DIOR's head ids: not DIOR, nothing known of its ranking.
    check_official_order("M_H.pth", "the split's head group", swapped, counts, [f"class {c}" for c in swapped])
    assert capsys.readouterr().out.startswith("note: M_H.pth records no classes: its output k is taken as the k-th "
                                              "class of the split's head group by training count")
    # The tail as the official RModel.py and Distill.py list it (M_T, and CDTG's 200000.pt).
    from tgn.split import OFFICIAL_DIOR_TAIL

    counts = list(range(12, 0, -1))
    check_official_order("M_T.pth", "the split's tail group", OFFICIAL_DIOR_TAIL, counts,
                         [DIOR_CLASSES[cid] for cid in OFFICIAL_DIOR_TAIL])
    assert capsys.readouterr().out == ""
    reversed_tail = OFFICIAL_DIOR_TAIL[::-1]
    with pytest.raises(UserError, match="its outputs are DIOR's tail classes as the official scripts rank them "
                                        "\\(4, 3, 10, 12, 7, 5, 8, 14, 1, 9, 6, 17\\), .* train the tail model on "
                                        "this data with KMDN/RModel.py \\(and CDTG/train.py\\) instead"):
        check_official_order("M_T.pth", "the split's tail group", reversed_tail, counts,
                             [DIOR_CLASSES[cid] for cid in reversed_tail])


def test_a_models_classes_are_checked_by_count_official_order_and_recorded_ids():
    """M_H, M_T and CDTG's teacher: the output count always; an official bare state dict
    by the training-count order; ours by the class ids and names they record (older ones
    record none), names with their spelling aside."""
    from tgn.errors import UserError
    from tgn.split import check_model_classes

    ours, official = {"state_dict": {}, "class_ids": [4, 2]}, {"conv1.weight": None}
    names = ["storage tank", "golf field"]  # the tail data's, in output order
    check_model_classes("M_T.pth", ours, 2, [4, 2], [5, 9], "the tail data", names)  # ours: the ids, not the counts
    check_model_classes("M_T.pth", {"state_dict": {}}, 2, [4, 2], [5, 9], "the tail data", names)  # no ids recorded
    check_model_classes("M_T.pth", official, 2, [2, 4], [9, 5], "the tail data", names)
    named = {**ours, "class_names": names}
    check_model_classes("M_T.pth", named, 2, [4, 2], [5, 9], "the tail data", ["Storage-Tank", "golf_field"])
    with pytest.raises(UserError, match="M_T.pth was trained with class 2 named 'golf field', the tail data names it "
                                        "'dam' \\(another dataset\\?\\)"):  # as many images per class, other classes
        check_model_classes("M_T.pth", named, 2, [4, 2], [5, 9], "the tail data", ["storage tank", "dam"])
    for checkpoint, num_classes, ids, counts, message in (
            (ours, 3, [4, 2], [5, 9], "M_T.pth has 3 classes, the tail data has 2"),
            (ours, 2, [2, 4], [9, 5], r"M_T.pth was trained on classes \[4, 2\], the tail data has \[2, 4\]"),
            (official, 2, [4, 2], [5, 9], "M_T.pth is an official file")):
        with pytest.raises(UserError, match=message):
            check_model_classes("M_T.pth", checkpoint, num_classes, ids, counts, "the tail data", names)


def test_a_split_json_edited_by_hand_is_refused(toy_data, tmp_path):
    """A split.json whose counts were edited by hand does not load as if made from DATA."""
    from KMDN.dataset_split import main as split_main
    from tgn.errors import UserError
    from tgn.split import load_split

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    path = tmp_path / "split" / "split.json"
    data = json.loads(path.read_text())
    data["classes"][0]["train_count"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="edited by hand"):
        load_split(tmp_path / "split")


def test_a_class_named_by_its_id_matches_any_name():
    """A dataset without classes.json names its classes by id: a model trained before the
    class list was written (or after it was removed) is still the dataset's."""
    from tgn.class_names import renamed_class

    assert renamed_class(["airport", "dam"], ["2", "dam"], [2, 3]) is None
    assert renamed_class(["2", "3"], ["airport", "dam"], [2, 3]) is None
    assert renamed_class(["airport", "3"], ["airport", "bridge"], [2, 3]) is None
    assert renamed_class(["airport", "dam"], ["Airport", "bridge"], [2, 3]) == 1
    assert renamed_class(None, ["airport"], [2]) is None


def test_group_samples_are_labelled_by_the_groups_ranking(tmp_path):
    """A group's labels follow its ranking, as the models record their classes (class_ids
    [2, 4, 0]) and official weights are read: labels by ascending id would train each output
    on another class, unseen by a dataset ranked in id order."""
    data = write_dataset(tmp_path / "data", {0: 3, 1: 9, 2: 5, 3: 12, 4: 4}, size=8)
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    split = load_split(tmp_path / "split")
    assert split.head == [3, 1] and split.tail == [2, 4, 0]  # not ascending: the point of the test
    for group in ("head", "tail"):
        samples = split.samples(group, "train")
        assert samples
        for path, label in samples:
            class_id = int(Path(path).parent.name)  # DATA/train/<class_id>/<file>
            assert label == split.ids(group).index(class_id), (group, path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("data_root"), "was edited by hand (no 'data_root'): make it again with KMDN/dataset_split.py"),
    (lambda s: s.update(classes=None), "was edited by hand (a value of the wrong type)"),
    (lambda s: s.update(head="3,4"), "was edited by hand (a value of the wrong type)"),
    (lambda s: s.update(head=[*s["head"], 9]), "its groups name class 9, which it does not list"),
    (lambda s: s.update(head=[*s["head"], s["tail"][0]]), "is in its groups twice"),
    (lambda s: s.update(tail=s["tail"][1:]), "is in neither group"),
])
def test_a_split_file_edited_by_hand_is_refused_in_one_line(split_dir, edit, message):
    """Its fingerprint covers the classes and counts only: the groups are checked apart."""
    split_file = split_dir / "split.json"
    recorded = json.loads(split_file.read_text())
    edit(recorded)
    split_file.write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_split(split_dir)
