"""Reading the dataset layout: spaces in names, bad lines, missing and broken images; the
preprocessing."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import write_dataset
from tgn.data import load_image, open_dataset, read_annotation, samples_for
from tgn.engine import model_input
from tgn.errors import UserError
from tgn.images import ImageList, build_transform


def test_file_names_with_spaces(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2}, file_pattern="my chip {k}.jpg")
    info = open_dataset(data)
    entries = info.entries("train")
    assert [e.relpath for e in entries[:2]] == ["0/my chip 0.jpg", "0/my chip 1.jpg"]
    dataset = ImageList(samples_for(info.image_root("train"), entries, {0: 0, 1: 1}), build_transform(8, False))
    image, label = dataset[3]
    assert image.shape == (3, 8, 8) and label.item() == 1


def test_every_pixel_value_scales_to_the_official_value_bit_for_bit():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    official = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(transforms.ToTensor()(Image.fromarray(pixels)))
    ours = model_input(torch.from_numpy(pixels).permute(2, 0, 1)[None], torch.device("cpu"))[0]
    assert torch.equal(ours, official)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_batches_scaled_on_the_device_are_the_official_preprocessing(tmp_path, train, channels_last):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(12):  # asymmetric images at another size: the resize and the flips show
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(paths[-1])
    steps = [transforms.Resize((16, 16))] + [transforms.RandomHorizontalFlip()] * train
    official = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ours = build_transform(16, train)
    torch.manual_seed(3)
    expected = torch.stack([official(load_image(path, 16)) for path in paths])
    torch.manual_seed(3)
    pixels = torch.stack([ours(load_image(path, 16)) for path in paths])
    assert pixels.dtype == torch.uint8 and pixels.shape == (12, 3, 16, 16)
    images = model_input(pixels, torch.device("cpu"), channels_last)
    assert torch.equal(images, expected)  # bit for bit
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if train:
        assert not torch.equal(images, model_input(torch.stack([build_transform(16, False)(load_image(path, 16))
                                                                for path in paths]), torch.device("cpu")))


def test_training_datasets_pickle_for_spawned_workers(tmp_path):
    # macOS and Windows start DataLoader workers by spawning: the dataset is pickled to them.
    from tgn.cache import ResizeCache
    from tgn.sampling import SeededItems

    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    info = open_dataset(data)
    samples = samples_for(info.image_root("train"), info.entries("train"), {0: 0, 1: 1})
    dataset = SeededItems(ImageList(samples, build_transform(8, True), 8, ResizeCache(tmp_path / "cache", 8)))
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[(3, 7)][0], dataset[(3, 7)][0]) and copy[(3, 7)][1].item() == 1


def test_bad_annotation_line_names_file_and_line(tmp_path):
    anno = tmp_path / "a.txt"
    anno.write_text("0/a.jpg 0\n0/b.jpg zero\n")
    with pytest.raises(UserError, match=r"a.txt:2: expected"):
        read_annotation(anno)
    for label in ("--1", "\u00b2"):  # let through by isdigit, refused by int()
        anno.write_text(f"0/a.jpg {label}\n", encoding="utf-8")
        with pytest.raises(UserError, match=r"a.txt:1: expected"):
            read_annotation(anno)


def test_missing_image_is_named_with_its_line(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    (data / "train" / "1" / "img 0.jpg").unlink()
    with pytest.raises(UserError, match=r"TOY_train.txt:3: image .*img 0.jpg does not exist \(fix or remove"):
        open_dataset(data).entries("train")


def test_annotation_encodings(tmp_path):
    anno = tmp_path / "a.txt"
    anno.write_bytes("\ufeff0/a b.jpg 0\r\n1/c.jpg 1\r\n\r\n".encode("utf-8"))  # Notepad: BOM, CRLF
    assert [(e.relpath, e.class_id) for e in read_annotation(anno)] == [("0/a b.jpg", 0), ("1/c.jpg", 1)]
    anno.write_bytes(b"\xef\xbb\xbf" + "0/a.jpg 0\n0/caf\u00e9.jpg 0\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"a.txt:2: not UTF-8 text \(byte 0xe9\)"):
        read_annotation(anno)


def test_file_names_with_unicode_line_separators_are_one_line_each(tmp_path):
    names = ["0/x\u2028y.jpg", "0/a\x85b.jpg", "1/p\x0cq\x1er.jpg", "1/u\u2029v.jpg"]  # str.splitlines splits these
    anno = tmp_path / "a.txt"
    anno.write_bytes("".join(f"{name} {name[0]}\n" for name in names).encode("utf-8"))
    assert [(e.relpath, e.class_id) for e in read_annotation(anno)] == [(name, int(name[0])) for name in names]


def test_an_image_in_both_lists_or_of_two_classes_is_refused_and_repeats_are_warned_of(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    train_list = data / "anno" / "TOY_train.txt"
    listed = train_list.read_text()
    test_image = (data / "anno" / "TOY_test.txt").read_text().splitlines()[0]
    train_list.write_text(listed + f"../test/{test_image}\n")
    with pytest.raises(UserError, match=r"TOY_train.txt lists \.\./test/0/.*, which .*TOY_test.txt lists too: "
                                        "training and test images must differ"):
        open_dataset(data).entries("train")
    (data / "test" / "0" / "held_out.jpg").write_bytes((data / "test" / test_image.rsplit(" ", 1)[0]).read_bytes())
    train_list.write_text(listed + "../test/0/held_out.jpg 0\n")  # outside train/, but in neither list twice
    with pytest.warns(UserWarning, match="1 lines list an image outside"):
        assert len(open_dataset(data).entries("train")) == 5
    first = listed.splitlines()[0]
    train_list.write_text(listed + first + "\n")
    with pytest.warns(UserWarning, match="1 lines list an image listed before: each line counts as one image"):
        assert len(open_dataset(data).entries("train")) == 5
    train_list.write_text(listed + first.rsplit(" ", 1)[0] + " 1\n")
    with pytest.raises(UserError, match="is listed with classes 0 and 1: an image has one label"):
        open_dataset(data).entries("train")


def test_class_list_mistakes_are_named(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    (data / "classes.json").write_text('{"dataset": "TOY", "classes": [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}]}')
    with pytest.raises(UserError, match="class id 0 is listed twice"):
        open_dataset(data)
    for classes, message in (('{"id": 0, "name": null}', r"class 0 has no name \(None\); name it as its CLIP"),
                             ('{"id": 0, "name": " "}', "class 0 has no name"),
                             ('{"id": 0.5, "name": "a"}', "class id 0.5 is not a whole number"),
                             ('{"id": "1.0", "name": "a"}', "class id '1.0' is not a whole number"),
                             ('{"id": "\u00b2", "name": "a"}', "class id '\u00b2' is not a whole number")):
        (data / "classes.json").write_text(f'{{"dataset": "TOY", "classes": [{classes}, {{"id": 1, "name": "b"}}]}}')
        with pytest.raises(UserError, match=message):
            open_dataset(data)
    (data / "classes.json").write_text('{"dataset": "TOY", "classes": [{"id": "0", "name": 7}, '
                                       '{"id": 1, "name": "b"}]}')
    assert open_dataset(data).class_names == {0: "7", 1: "b"}  # as earlier versions read it
    (data / "classes.json").write_text('{"dataset": "TOY", "classes": [{"id": 0.0, "name": "a"}, '
                                       '{"id": " 1", "name": "b"}]}')
    assert open_dataset(data).class_names == {0: "a", 1: "b"}
    (data / "classes.json").unlink()
    (data / "classes.json").mkdir()
    with pytest.raises(UserError, match="classes.json is a folder; the class list is a file"):
        open_dataset(data)
    (data / "classes.json").rmdir()
    (data / "classes.json").write_text('{"dataset": "Other", "classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}')
    with pytest.raises(UserError, match=r"Other_train.txt \(its name comes from the \"dataset\" field"):
        open_dataset(data).entries("train")
    (data / "classes.json").write_text('{"classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}')
    (data / "anno" / "TOY_test.txt").unlink()  # the name came from TOY_train.txt, not from a field
    with pytest.raises(UserError, match=r"annotation file not found: .*TOY_test.txt$"):
        open_dataset(data).entries("test")


def test_unknown_class_id_is_named(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    with open(data / "anno" / "TOY_train.txt", "a") as handle:
        handle.write("7/x.jpg 7\n")
    with pytest.raises(UserError, match="class id 7"):
        open_dataset(data).entries("train", check_files=False)


def test_undecodable_image_is_named(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    broken = data / "train" / "0" / "img 1.jpg"
    broken.write_bytes(b"not a jpeg")
    info = open_dataset(data)
    dataset = ImageList(samples_for(info.image_root("train"), info.entries("train"), {0: 0, 1: 1}))
    with pytest.raises(UserError, match="cannot read image .*img 1.jpg"):
        dataset[1]


def test_an_image_past_pils_pixel_limit_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (a header claiming over ~179M pixels: a corrupt file or
    a whole scene) is no OSError; it must still be one line, or skipped with the flag."""
    from PIL import Image

    from tgn.data import drop_unreadable, load_image

    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 40 is then past twice the limit
    with pytest.raises(UserError, match="cannot read image .*huge.png"):
        load_image(path)
    assert drop_unreadable([(str(path), 0)], True) == []


def test_float_images_are_refused_rather_than_clipped_to_black(tmp_path):
    import numpy as np
    from PIL import Image

    from tgn.data import load_image

    path = tmp_path / "reflectance.tif"
    Image.fromarray(np.full((8, 8), 0.4, dtype=np.float32), mode="F").save(path)
    with pytest.raises(UserError, match="reflectance.tif: 32-bit float pixels have no fixed range"):
        load_image(path)


def test_integer_images_beyond_16_bits_are_refused_rather_than_clipped(tmp_path):
    """32-bit or signed integers past 0..65535 have no scale to 8 bits (clipped, most of a
    32-bit image was white and half of a signed one black); within it they load scaled."""
    import numpy as np
    from PIL import Image

    from tgn.data import load_image

    for name, low, high in (("counts.tif", 4336, 997111), ("signed.tif", -2000, 2000)):
        path = tmp_path / name
        Image.fromarray(np.linspace(low, high, 64).reshape(8, 8).astype(np.int32), mode="I").save(path)
        with pytest.raises(UserError, match=f"{name}: its integer pixels reach {high if low >= 0 else low}, "
                                            "outside 0..65535"):
            load_image(path)
    path = tmp_path / "twelve-bit.tif"
    Image.fromarray(np.linspace(0, 4095, 64).reshape(8, 8).astype(np.int32), mode="I").save(path)
    assert np.asarray(load_image(path)).max() == round(4095 / 257)


def test_without_classes_json_classes_are_named_by_id(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 3: 2})
    (data / "classes.json").unlink()
    with pytest.warns(UserWarning, match="classes.json"):
        info = open_dataset(data)
    assert info.name == "TOY" and info.class_names == {0: "0", 3: "3"}
    anno = data / "anno"
    (anno / "._TOY_train.txt").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS's copy of its metadata
    with pytest.warns(UserWarning, match="classes.json"):
        assert open_dataset(data).name == "TOY"


def test_without_classes_json_dior_and_fgsc23_are_named_in_their_official_order(tmp_path):
    """The official preprocessed downloads have no classes.json: their names, the CLIP
    prompts' words, come from the official lists; a split made by an earlier version, which
    named them by id, still matches the folder."""
    from tgn.split import check_split_matches, compute_split, write_split, load_split

    for name, counts, expected in (("DIOR", {3: 3, 15: 2}, {3: "basketball court", 15: "storage tank"}),
                                   ("FGSC", {0: 2, 22: 2}, {0: "non-ship", 22: "barge"})):
        data = write_dataset(tmp_path / name, counts, name=name)
        (data / "classes.json").unlink()
        assert open_dataset(data).class_names == expected
    data = write_dataset(tmp_path / "DIOR-more", {0: 2, 20: 2}, name="DIOR")  # no DIOR class 20: by id
    (data / "classes.json").unlink()
    with pytest.warns(UserWarning, match="named by id"):
        assert open_dataset(data).class_names == {0: "0", 20: "20"}

    info = open_dataset(tmp_path / "DIOR")
    by_id, entries = compute_split(info, 50)
    by_id.class_names = {cid: str(cid) for cid in by_id.class_names}  # as earlier versions wrote it
    write_split(by_id, entries, tmp_path / "old-split")
    check_split_matches(load_split(tmp_path / "old-split"), info)
    from CDTG.dataset_split import main as cdtg_split_main  # its prompts take the dataset's names

    cdtg_split_main(["--split", str(tmp_path / "old-split"), "--out", str(tmp_path / "tail")])
    tail = json.loads((tmp_path / "tail" / "tail_classes.json").read_text())["classes"]
    assert [cls["prompt"] for cls in tail] == ["A photo of a storage tank"]
    respelled, entries = compute_split(info, 50)
    respelled.class_names = {3: "basketballcourt", 15: "Storage-Tank"}  # as the XML and earlier preparers spell them
    write_split(respelled, entries, tmp_path / "respelled-split")
    check_split_matches(load_split(tmp_path / "respelled-split"), info)
    renamed, entries = compute_split(info, 50)
    renamed.class_names = {3: "basketball court", 15: "ship"}
    write_split(renamed, entries, tmp_path / "other-split")
    with pytest.raises(UserError, match="made from another dataset"):
        check_split_matches(load_split(tmp_path / "other-split"), info)


def test_class_names_compare_with_their_spelling_aside():
    from tgn.class_names import class_name_key as key

    assert key("Expressway-Service-area") == key("expressway service area") == key("expressway_service__area")
    assert key("basketballcourt") == key("basketball court") == key("Basketball-Court")
    assert key("E\u0301olienne") == key("\u00c9olienne")  # macOS decomposes accents
    assert key("ship") != key("ships") and key("small vehicle") != key("large vehicle")


def test_an_image_listed_under_another_class_folder_is_warned_about(tmp_path):
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    (data / "train" / "0" / "extra.jpg").write_bytes((data / "train" / "0" / "img 0.jpg").read_bytes())
    with open(data / "anno" / "TOY_train.txt", "a") as handle:
        handle.write("0/extra.jpg 1\n")  # folder 0, label 1
    with pytest.warns(UserWarning, match=r"1 lines list an image in another class's folder \(e.g. '0/extra.jpg 1'\)"):
        entries = open_dataset(data).entries("train")
    assert entries[-1].class_id == 1


def test_a_folder_listed_as_an_image_is_named_with_its_line(tmp_path):
    """An annotation line naming a folder where an image belongs (a path cut short, an
    image replaced by an unpacked folder) is refused when the dataset is opened, naming
    the annotation line, rather than stopping training later at that image."""
    from tgn.data import open_dataset

    root = write_dataset(tmp_path / "d", {0: 2, 1: 2})
    image = root / "train" / "1" / "img 0.jpg"
    image.unlink()
    image.mkdir()
    with pytest.raises(UserError, match=r"TOY_train\.txt:3: image .*img 0\.jpg does not exist"):
        open_dataset(root).entries("train")


def test_a_class_list_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows PowerShell 5.1 writes one with -Encoding UTF8 (and CR-LF line ends)."""
    data = write_dataset(tmp_path / "d", {0: 2, 1: 2}, class_names={0: "ship", 1: "storage tank"})
    text = (data / "classes.json").read_text(encoding="utf-8")
    (data / "classes.json").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert open_dataset(data).class_names == {0: "ship", 1: "storage tank"}


def test_the_decode_check_finds_every_unreadable_image_across_its_chunks(tmp_path, monkeypatch):
    import tgn.data

    paths = []
    for index in range(7):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (8, 8), (index * 30, 0, 0)).save(path)
        paths.append(str(path))
    for index in (1, 4, 6):  # in three chunks of two
        (tmp_path / f"{index}.png").write_bytes((tmp_path / f"{index}.png").read_bytes()[:20])
    monkeypatch.setattr(tgn.data, "CHECK_CHUNK", 2)
    assert tgn.data.find_unreadable([(path, 0) for path in paths], workers=2) == [paths[1], paths[4], paths[6]]


def test_an_image_list_keeps_its_samples_in_arrays_and_reads_any_file_name(tmp_path):
    """Arrays, which DataLoader workers read without copying them page by page (a list of
    tuples is copied as its reference counts change); names of any system round trip."""
    names = ["plain.png", "façade é.png", "ünïcode 雪.png"]
    if os.name == "posix":  # a name that is not UTF-8 (an archive made on another system)
        names.append(os.fsdecode(b"latin-1 caf\xe9.png"))
    for index, name in enumerate(names):
        Image.new("RGB", (6, 4), (index * 80, 0, 0)).save(tmp_path / name)
    samples = [(str(tmp_path / name), index + 3) for index, name in enumerate(names)]
    images = ImageList(samples, transforms.PILToTensor())
    assert all(isinstance(array, np.ndarray) for array in (images.path_bytes, images.path_ends, images.labels))
    assert images.samples == samples and images.targets() == list(range(3, 3 + len(names)))
    assert [images[index][1].item() for index in range(len(names))] == images.targets()  # every name read
    image, label = images[2]
    assert label.item() == 5 and image[0, 0, 0].item() == 160
    assert pickle.loads(pickle.dumps(images)).samples == samples  # as spawned workers receive it


def test_loader_workers_start_from_a_fork_server_where_fork_may_hang_under_torchrun(tmp_path, monkeypatch):
    """CPython before 3.11.8 can deadlock a forked child on a lock another thread held
    (gh-112275): under torchrun a rank's evaluation worker hung at its start. There the
    workers start from a fork server, and give the batches forked ones give."""
    import multiprocessing

    import tgn.engine as engine
    from tgn import distributed as dist

    if "forkserver" not in multiprocessing.get_all_start_methods() or engine.worker_start_method() != "fork":
        pytest.skip("workers are not forked here")
    for index in range(5):
        Image.new("RGB", (8, 8), (40 * index, 9, 9)).save(tmp_path / f"{index}.png")
    images = ImageList([(str(tmp_path / f"{index}.png"), index % 2) for index in range(5)],
                       build_transform(8, train=True), 8)
    forked = [batch for batch in engine.make_loader(images, 2, train=True, workers=1, seed=3)]
    assert engine.worker_context(1) is None and not engine.keep_evaluation_workers()
    monkeypatch.setattr(engine, "FORK_MAY_HANG", True)
    monkeypatch.setattr(dist, "planned_world_size", lambda: 2)
    assert engine.worker_start_method() == "forkserver" and engine.keep_evaluation_workers()
    monkeypatch.setattr(dist, "local_batch", lambda batch, flag="": batch)  # one process's loader, as a single run
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    loader = engine.make_loader(images, 2, train=True, workers=1, seed=3)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    served = list(loader)
    assert len(served) == len(forked) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                              for a, b in zip(served, forked))
    monkeypatch.setattr(engine, "FORK_MAY_HANG", False)
    assert engine.worker_context(1) is None


@pytest.mark.parametrize("size, decoded", [(16, 16), (20, 32), (33, 64)])
def test_jpeg_draft_decodes_at_the_smallest_scale_not_below_the_target(tmp_path, size, decoded):
    """Draft mode picks the smallest of 1/8 .. 1/1 scale that still covers the target size:
    never below it (resizing up would blur), never the full image when a scale suffices."""
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "x.jpg")
    assert load_image(tmp_path / "x.jpg", size).size == (decoded, decoded)


def test_the_decode_check_takes_this_process_s_share_of_the_cores(monkeypatch):
    """Under torchrun every process of a node checks the same images: each takes its share."""
    import tgn.cli

    monkeypatch.setattr(tgn.cli, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tgn.cli.cpus_per_process() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert tgn.cli.cpus_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert tgn.cli.cpus_per_process() == 1
