"""Shared fixtures: tiny image datasets written into a temporary folder."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead

import json  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tgn.compat import COMPILE_SINCE, torch_version  # noqa: E402

# The scripts refuse --compile on older torch releases (tgn/compat.py).
needs_compile = pytest.mark.skipif(torch_version() < COMPILE_SINCE, reason="--compile needs a newer torch")

# Colours far apart so that a tiny CNN separates the classes within a few steps.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
           (70, 240, 240), (245, 130, 48), (128, 128, 128), (250, 190, 212), (0, 0, 128)]


def write_dataset(root, train_counts, test_counts=None, size=16, name="TOY", seed=0, class_names=None,
                  file_pattern="img {k}.jpg"):
    """A dataset in the official layout: class c is a noisy image of colour PALETTE[c]."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    test_counts = test_counts if test_counts is not None else {cid: 3 for cid in train_counts}
    (root / "anno").mkdir(parents=True, exist_ok=True)
    for subset, counts in (("train", train_counts), ("test", test_counts)):
        lines = []
        for cid, count in counts.items():
            folder = root / subset / str(cid)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                colour = np.array(PALETTE[cid % len(PALETTE)], dtype=np.float64)
                pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                file_name = file_pattern.format(k=k)
                Image.fromarray(pixels).save(folder / file_name, quality=95)
                lines.append(f"{cid}/{file_name} {cid}\n")
        (root / "anno" / f"{name}_{subset}.txt").write_text("".join(lines))
    names = class_names or {cid: f"class {cid}" for cid in train_counts}
    (root / "classes.json").write_text(json.dumps(
        {"dataset": name, "classes": [{"id": cid, "name": names[cid]} for cid in sorted(train_counts)]}))
    return root


@pytest.fixture
def toy_data(tmp_path):
    """Five classes, long-tailed: 12, 10, 8, 4, 3 training images of 16 px."""
    return write_dataset(tmp_path / "data", {0: 12, 1: 10, 2: 8, 3: 4, 4: 3})


@pytest.fixture
def split_dir(toy_data, tmp_path):
    """toy_data's KMDN split, made with the default 40%."""
    from KMDN.dataset_split import main as split_main

    split_main(["--data-root", str(toy_data), "--out", str(tmp_path / "split")])
    return tmp_path / "split"


def tiny_clip():
    """A randomly initialised clip.model.CLIP small enough for CPU tests (32 px input)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
    torch.manual_seed(0)
    # CLIP derives attention heads as width // 64, so 64 is the smallest usable width.
    return clip.model.CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                           context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                           transformer_layers=1).float().eval()


TAIL_IDS = [2, 3, 4]  # the tail classes of cdtg_inputs' dataset


@pytest.fixture
def cdtg_inputs(tmp_path):
    """Toy data at 32 px, its split, the CDTG tail data, a tiny M_T and a tiny CLIP file."""
    from CDTG.dataset_split import main as cdtg_split_main
    from KMDN.dataset_split import main as split_main
    from tgn.io import atomic_torch_save
    from tgn.resnet import FeatureResNet

    data = write_dataset(tmp_path / "data", {0: 12, 1: 10, 2: 8, 3: 4, 4: 4}, size=32,
                         class_names={0: "ship", 1: "vehicle", 2: "airport", 3: "dam", 4: "golf field"})
    split_main(["--data-root", str(data), "--out", str(tmp_path / "split")])
    cdtg_split_main(["--split", str(tmp_path / "split"), "--out", str(tmp_path / "cdtg_data")])
    torch.manual_seed(0)
    teacher = FeatureResNet("resnet18", num_classes=3, width=4)
    atomic_torch_save(tmp_path / "M_T.pth", {"state_dict": teacher.state_dict(), "model_config": teacher.config,
                                             "class_ids": TAIL_IDS, "class_names": ["airport", "dam", "golf field"]})
    torch.save(tiny_clip().state_dict(), tmp_path / "clip.pt")
    return tmp_path


def decode_sizes(monkeypatch):
    """The size each image decode of the data path asks for, as it happens (in this
    process: --workers 0): the target size in draft mode, None for a full decode."""
    import tgn.cache
    import tgn.images

    sizes, decode = [], tgn.images.load_image
    for module in (tgn.images, tgn.cache):
        monkeypatch.setattr(module, "load_image", lambda path, size=None: sizes.append(size) or decode(path, size))
    return sizes


def exit_message(capsys, main, argv):
    """The one line a script prints when it refuses its input (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def script_accuracies(monkeypatch, accuracies, *modules):
    """`evaluate` in each of `modules` runs the real evaluation and reports `accuracies` as
    the overall accuracy, one per call: which epoch is best, chosen by the test."""
    import tgn.engine

    real_evaluate, accuracies = tgn.engine.evaluate, iter(accuracies)

    def scripted(*args, **kwargs):
        cm, summary = real_evaluate(*args, **kwargs)
        return cm, {**summary, "overall_accuracy": next(accuracies)}

    for module in modules:
        monkeypatch.setattr(module, "evaluate", scripted)
