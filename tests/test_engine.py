"""The ResNet trainers' engine, sampler, resize cache and image list, checked piece by
piece: non-finite losses at any step, training accuracy, batch shares, resume trimming,
per-item seeds, cache entries, layouts and precisions."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tgn.cache as cache_module
from tgn import distributed as dist
from tgn.engine import (TrainConfig, autocast, make_loader, model_input, prepare_model, ran_with, resolve_precision,
                        resume_from_last, train_one_epoch)
from tgn.errors import CollectiveError, UserError
from tgn.images import ImageList
from tgn.sampling import EpochSampler, SeededItems


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, generator=g), torch.tensor([0, 1])) for _ in range(n)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_in_the_last_unchecked_steps_stops_the_epoch(bad):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def loss_fn(m, x, y):
        logits = m(x)
        loss = F.cross_entropy(logits, y)
        calls.append(1)
        return (loss * bad if len(calls) == 3 else loss), logits

    with pytest.raises(CollectiveError, match="loss became"):
        train_one_epoch(model, _batches(3), opt, loss_fn, torch.device("cpu"), check_every=20)


def test_float_batches_are_taken_as_already_scaled():
    x = torch.full((1, 3, 2, 2), 0.25)
    assert torch.equal(model_input(x.clone(), torch.device("cpu")), x)


def test_an_evaluation_loader_rounds_each_process_share_of_the_batch_up(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    assert make_loader(list(range(7)), 8, train=False).batch_size == 3
    assert make_loader(list(range(7)), 2, train=False).batch_size == 1


def test_a_run_without_a_checkpoint_drops_every_logged_epoch(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    assert resume_from_last(tmp_path, True, 5, lambda state: None)[0] == 0
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_seeded_items_restore_the_global_generator():

    class Draw:
        def __getitem__(self, i):
            return torch.rand(1)

    torch.manual_seed(1)
    expected = torch.rand(1)
    torch.manual_seed(1)
    first = SeededItems(Draw())[(0, 5)]
    assert torch.equal(torch.rand(1), expected)
    assert torch.equal(SeededItems(Draw())[(3, 5)], first)  # the draw depends on the seed alone


def _cache_setup(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(path)
    calls = []
    real = cache_module.load_image
    monkeypatch.setattr(cache_module, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    return cache_module.ResizeCache(tmp_path / "c", 8), path, calls


def test_a_cache_entry_one_zero_byte_too_long_is_rebuilt(tmp_path, monkeypatch):
    cache, path, calls = _cache_setup(tmp_path, monkeypatch)
    first = cache.load(path)
    entry = cache.entry(path)
    with open(entry, "ab") as handle:
        handle.write(b"\0")
    assert torch.equal(cache.load(path), first) and len(calls) == 2
    assert entry.stat().st_size == 8 * 8 * 3 + 4


def test_a_failed_write_of_an_entry_another_process_wrote_is_not_warned_of(tmp_path, monkeypatch):
    cache, path, calls = _cache_setup(tmp_path, monkeypatch)
    cache.load(path)
    entry = cache.entry(path)
    entry.write_bytes(b"partial")  # not an entry: rebuilt, but its write fails
    monkeypatch.setattr(cache_module.tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(OSError(28, "No space")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.load(path)


def test_every_process_gets_a_share_when_the_epoch_is_shorter_than_the_padding(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    shares = []
    for rank in range(4):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        sampler = EpochSampler(1, shuffle=True, seed=0, batch_size=8, drop_single=False)
        shares.append(list(sampler))
        assert len(sampler) == 1
    assert [len(s) for s in shares] == [1, 1, 1, 1] and len({s[0] for s in shares}) == 1


def test_each_epoch_records_the_process_count(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    assert ran_with(TrainConfig(1, 8, 0.1, 0.0, []))["processes"] == 4


@pytest.mark.parametrize("draft, asked", [(True, 8), (False, None)])
def test_a_full_decode_cache_decodes_in_full(tmp_path, monkeypatch, draft, asked):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    sizes = []
    real = cache_module.load_image
    monkeypatch.setattr(cache_module, "load_image", lambda p, size: sizes.append(size) or real(p, size))
    cache_module.ResizeCache(tmp_path / "c", 8, draft=draft).load(path)
    assert sizes == [asked]


def test_training_accuracy_counts_every_correct_image():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [(torch.rand(4, 3), torch.tensor([0, 0, 0, 1])) for _ in range(2)]
    stats = train_one_epoch(model, batches, opt, lambda m, x, y: (F.cross_entropy(m(x), y), m(x)), torch.device("cpu"))
    assert stats["train_accuracy"] == pytest.approx(0.75)


def test_an_unreadable_image_hint_tells_real_from_generated(tmp_path):
    images = ImageList([(tmp_path / "real.png", 0), (tmp_path / "gen.png", 1)], image_size=8, generated_from=1)
    with pytest.raises(UserError, match="skip-bad-images"):
        images[0]
    with pytest.raises(UserError, match="generation.py again"):
        images[1]


def test_channels_last_puts_the_model_in_that_layout():
    model, net = prepare_model(torch.nn.Conv2d(3, 4, 3), TrainConfig(1, 8, 0.1, 0.0, [], channels_last=True),
                               torch.device("cpu"))
    assert model.weight.is_contiguous(memory_format=torch.channels_last) and net is model


def test_channels_last_none_is_auto():
    assert resolve_precision("off", None, torch.device("cuda")) == ("off", True)
    assert resolve_precision("off", None, torch.device("cpu")) == ("off", False)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_takes_the_precision_asked_for(amp, dtype):
    with autocast(torch.device("cpu"), amp):
        out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    assert out.dtype == dtype


def test_a_set_of_one_image_trains_on_it():
    assert len(list(EpochSampler(1, shuffle=True, batch_size=8))) == 1
