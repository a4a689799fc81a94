"""CDTG: tail data, CLIP and teacher losses that really train G, the loop, resume, generation."""
import argparse
import json
import math
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import CDTG.trainer as trainer_module
# the cdtg_inputs fixture lives in conftest
from conftest import PALETTE, TAIL_IDS, decode_sizes, exit_message, tiny_clip
from CDTG.checkpoint import checkpoint_steps, load_cdtg_checkpoint
from CDTG.dataset_split import main as cdtg_split_main
from CDTG.clip_loss import ClipConsistencyLoss, load_clip
from CDTG.config import GanConfig
from CDTG.fusion import NoiseFusion
from CDTG.generation import main as generation_main
from CDTG.losses import (d_logistic_loss, d_r1_loss, g_nonsaturating_loss, g_path_regularize,
                         teacher_classification_loss)
from CDTG.swagan import Discriminator, Generator
from CDTG.parallel import StepNoise
from CDTG.synthesis import TailSynthesizer
from CDTG.tail_data import StepBatchSampler, load_tail_classes, load_teacher
from CDTG.train import build_parser
from CDTG.train import main as train_main
from CDTG.trainer import CdtgTrainer, accumulate
from KMDN.dataset_split import main as split_main
from CDTG.training import gan_config
from tgn.compat import can_load_classes
from tgn.errors import UserError
from tgn.resnet import FeatureResNet


def tiny_train_args(root, out, *extra):
    return ["--data", str(root / "cdtg_data"), "--teacher", str(root / "M_T.pth"), "--clip", str(root / "clip.pt"),
            "--out", str(out), "--size", "32", "--latent", "16", "--n-mlp", "2", "--channel-max", "16",
            "--batch", "4", "--d-reg-every", "2", "--g-reg-every", "2", "--save-every", "2", "--sample-every", "2",
            "--log-every", "1", "--workers", "0", "--device", "cpu", *extra]


def test_tail_data_manifest(cdtg_inputs):
    tail = load_tail_classes(cdtg_inputs / "cdtg_data")
    assert tail.ids == TAIL_IDS
    assert tail.prompts == ["A photo of a airport", "A photo of a dam", "A photo of a golf field"]
    labels = sorted({label for _, label in tail.samples()})
    assert labels == [0, 1, 2] and len(tail.samples()) == 16
    assert all(str(cdtg_inputs / "data") in path for path, _ in tail.samples())


def test_tail_data_that_no_longer_lists_datas_tail_images_is_refused(cdtg_inputs, capsys):
    """KMDN refuses its split once DATA lists other images; CDTG trained on the stale list."""
    data, anno = cdtg_inputs / "data", cdtg_inputs / "data" / "anno" / "TOY_train.txt"
    original = anno.read_text()
    shutil.copy(data / "train" / "3" / "img 0.jpg", data / "train" / "3" / "new.jpg")
    anno.write_text(original + "3/new.jpg 3\n")  # DATA prepared again with one tail image more
    with pytest.raises(UserError, match=re.escape(
            f"{cdtg_inputs / 'cdtg_data' / 'train.txt'} lists other tail images than {anno} (1 listed there is new "
            "to it): DATA changed since the tail data was made; make "
            "the splits again (KMDN/dataset_split.py, then CDTG/dataset_split.py)")):
        load_tail_classes(cdtg_inputs / "cdtg_data").samples()
    argv = tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1")
    assert "lists other tail images than" in exit_message(capsys, train_main, argv)
    anno.write_text(original + "0/img 0.jpg 0\n")  # a head image more: not the tail data's
    assert len(load_tail_classes(cdtg_inputs / "cdtg_data").samples()) == 16


def test_step_batches_depend_only_on_seed_and_step():
    whole = list(StepBatchSampler(50, 4, seed=1, start=0, end=30))
    tail = list(StepBatchSampler(50, 4, seed=1, start=15, end=30))
    assert tail == whole[15:] and whole[0] != whole[1]
    assert list(StepBatchSampler(50, 4, seed=2, start=0, end=30)) != whole


def test_step_batches_go_through_shuffled_epochs_without_replacement():
    """As the official loader (RandomSampler, drop_last=True): an epoch of 50 images in
    batches of 4 is 12 batches of 48 distinct images; the next epoch is another order."""
    batches = list(StepBatchSampler(50, 4, seed=1, start=0, end=24))
    first, second = sum(batches[:12], []), sum(batches[12:], [])
    assert len(set(first)) == len(first) == 48 and len(set(second)) == 48
    assert set(first) <= set(range(50)) and first != second
    small = list(StepBatchSampler(3, 8, seed=1, start=0, end=2))  # fewer images than a batch: cycled
    assert all(len(batch) == 8 and sorted(set(batch)) == [0, 1, 2] for batch in small)
    assert all(max(batch.count(index) for index in batch) == 3 for batch in small)


def test_each_process_draws_its_own_stream_and_the_epoch_order_its_own_on_cpus_too(monkeypatch):
    """torch's CPU generator reads only a seed's low 32 bits: offsets in the high bits left
    ADA's draws equal to the shared latents and alike in every process, and an epoch's order
    drawn from the stream of its step's noise."""
    import tgn.distributed
    from CDTG.parallel import epoch_order_seed, step_seed

    noise = StepNoise(torch.device("cpu"), 8, 0.0, [], 2)
    own = {}
    for rank in (0, 1):
        monkeypatch.setattr(tgn.distributed, "rank", lambda rank=rank: rank)
        noise.reseed(3, 5)
        own[rank] = torch.randn(2, 8)  # this process's generator: ADA's draws
    shared = torch.randn(2, 8, generator=torch.Generator().manual_seed(step_seed(3, 5)))
    assert not torch.equal(own[0], shared) and not torch.equal(own[0], own[1])
    for seed, epoch in ((0, 0), (3, 5), (2**32 - 1, 7)):
        order = torch.randperm(50, generator=torch.Generator().manual_seed(epoch_order_seed(seed, epoch)))
        step = torch.randperm(50, generator=torch.Generator().manual_seed(step_seed(seed, epoch)))
        assert not torch.equal(order, step)


def test_image_seeds_are_distinct_in_the_32_bits_a_cpu_generator_reads():
    from CDTG.synthesis import image_seed

    for seed in (0, 7, 20240517):
        low_bits = {image_seed(seed, cid, index) % 2**32 for cid in (0, 1, 19, 4293) for index in range(3000)}
        assert len(low_bits) == 4 * 3000


def test_clip_loss_is_differentiable_and_clip_stays_frozen():
    clip_model = tiny_clip()
    loss_fn = ClipConsistencyLoss(clip_model, ["A photo of a dam", "A photo of a airport"])
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    loss = loss_fn(images * 2 - 1, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip_model.parameters())
    # Cross-entropy on CLIP's scaled logits, no softmax before it, computed here from CLIP itself.
    import clip

    with torch.no_grad():
        image = torch.nn.functional.normalize(clip_model.encode_image(loss_fn.preprocess(images * 2 - 1)), dim=-1)
        text = torch.nn.functional.normalize(clip_model.encode_text(clip.tokenize(
            ["A photo of a dam", "A photo of a airport"])), dim=-1)
        logits = clip_model.logit_scale.exp() * image @ text.t()
    assert clip_model.logit_scale.exp() > 10  # the scale matters: CE of unscaled cosines would differ
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_clip_preprocessing_normalises_like_clip():
    loss_fn = ClipConsistencyLoss(tiny_clip(), ["A photo of a dam"])
    grey = torch.zeros(1, 3, 8, 8)  # 0 in [-1, 1] is 0.5 in [0, 1]
    out = loss_fn.preprocess(grey)
    assert out.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(out[0, :, 5, 5], expected)


def test_clip_preprocessing_matches_clips_own_on_the_saved_image():
    """CLIP's preprocess (PIL bicubic resize, antialiased) of the 8-bit image a fake is saved
    as, against ours on the tensor: the same up to the 8-bit rounding and resampling details."""
    clip = pytest.importorskip("clip")
    loss_fn = ClipConsistencyLoss(tiny_clip(), ["A photo of a dam"])
    torch.manual_seed(0)
    fake = (torch.rand(1, 3, 64, 64) * 2.4 - 1.2)  # high-frequency content, beyond [-1, 1] in places
    pixels = ((fake[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    reference = clip.clip._transform(32)(Image.fromarray(pixels))
    ours = loss_fn.preprocess(fake)[0]
    assert (ours - reference).abs().mean() < 0.015  # 0.005; without the clamp 0.027, without antialiasing 0.45


def test_clip_loads_from_a_plain_state_dict_file(tmp_path):
    torch.save(tiny_clip().state_dict(), tmp_path / "clip.pt")
    model = load_clip(str(tmp_path / "clip.pt"), torch.device("cpu"))
    assert model.visual.input_resolution == 32 and next(model.parameters()).dtype == torch.float32


CLIP_FETCHER = """
import shutil, sys, time
sys.path.insert(0, sys.argv[1])
from tgn.runlock import one_at_a_time
with one_at_a_time(sys.argv[2]):
    print("fetching", flush=True)
    time.sleep(1)
    shutil.copy(sys.argv[3], sys.argv[4])
"""


def test_processes_starting_together_fetch_clip_once(tmp_path, monkeypatch):
    """Under torchrun every process loads CLIP at once, and clip.load writes its download
    straight to the final name: one fetches it while the others wait, then find it."""
    import hashlib
    import subprocess
    import sys

    from conftest import ROOT
    from CDTG.clip_loss import clip_download_lock, import_clip

    clip = import_clip()
    torch.save(tiny_clip().state_dict(), tmp_path / "weights.pt")
    digest = hashlib.sha256((tmp_path / "weights.pt").read_bytes()).hexdigest()
    # No file at the address: a process that did not wait would fail to download it.
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", (tmp_path / "nowhere" / digest / "ViT-B-32.pt").as_uri())
    root = tmp_path / "cache"
    fetcher = subprocess.Popen([sys.executable, "-c", CLIP_FETCHER, str(ROOT), str(clip_download_lock(root, "ViT-B/32")),
                                str(tmp_path / "weights.pt"), str(root / "ViT-B-32.pt")], stdout=subprocess.PIPE, text=True)
    assert fetcher.stdout.readline() == "fetching\n"
    model = load_clip("ViT-B/32", torch.device("cpu"), root)
    assert fetcher.wait() == 0 and model.visual.input_resolution == 32


def make_trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    g = Generator(32, 16, 2, num_classes=3, channel_max=16)
    d = Discriminator(32, 3, label_dim=16, channel_max=16)
    g_ema = Generator(**g.config)
    accumulate(g_ema, g, 0)
    teacher = FeatureResNet("resnet18", num_classes=3, width=4)
    fusion = NoiseFusion(16 * 2 * 2, 16, lr_mul=0.01)
    cfg = GanConfig(batch=4, workers=0, **overrides)
    clip_loss = ClipConsistencyLoss(tiny_clip(), ["a", "b", "c"])
    return CdtgTrainer(g, d, g_ema, fusion, teacher, clip_loss, cfg, torch.device("cpu"), tmp_path,
                       {"class_ids": TAIL_IDS})


@pytest.mark.parametrize("term", ["lambda_cls", "lambda_clip"])
def test_each_loss_term_reaches_the_generator(tmp_path, term):
    def generator_grad(**weights):
        trainer = make_trainer(tmp_path, **weights)
        torch.manual_seed(1)
        fake, _ = trainer.g([torch.randn(4, 16)], torch.tensor([0, 1, 2, 0]))
        loss, _ = trainer.generator_loss(fake, torch.tensor([0, 1, 2, 0]))
        loss.backward()
        assert all(p.grad is None for p in trainer.teacher.parameters())
        return torch.cat([p.grad.flatten() for p in trainer.g.parameters() if p.grad is not None])

    adversarial_only = generator_grad(lambda_cls=0.0, lambda_clip=0.0)
    with_term = generator_grad(**{"lambda_cls": 0.0, "lambda_clip": 0.0, term: 1.0})
    disabled_again = generator_grad(**{"lambda_cls": 0.0, "lambda_clip": 0.0, term: 0.0})
    assert not torch.allclose(adversarial_only, with_term)
    assert torch.equal(adversarial_only, disabled_again)


def test_the_fused_latent_mixes_noise_and_feature_by_the_ratio():
    torch.manual_seed(0)
    fusion = NoiseFusion(16 * 2 * 2, 8, lr_mul=0.01)
    noise, feature = torch.randn(3, 8), torch.rand(3, 16, 2, 2)
    torch.testing.assert_close(fusion(noise, feature, 0.8), 0.8 * noise + 0.2 * fusion.embed(feature))
    assert GanConfig(batch=4).fusion_noise == 0.8  # training's mix: mostly noise


def test_the_generator_loss_weights_each_term(tmp_path):
    torch.manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0])
    for weights, kept, left_out in (({"lambda_cls": 2.0, "lambda_clip": 0.0}, "cls", "clip"),
                                    ({"lambda_cls": 0.0, "lambda_clip": 3.0}, "clip", "cls")):
        trainer = make_trainer(tmp_path, **weights)
        fake, _ = trainer.g([torch.randn(4, 16)], labels)
        total, parts = trainer.generator_loss(fake, labels)
        weight = weights["lambda_cls"] or weights["lambda_clip"]
        assert left_out not in parts
        torch.testing.assert_close(total.detach(), parts["g_adv"] + weight * parts[kept])


def test_the_losses_push_the_right_way():
    real, fake = torch.full((4,), 3.0), torch.full((4,), -3.0)  # D is right about both
    assert d_logistic_loss(real, fake) < d_logistic_loss(fake, real)
    assert g_nonsaturating_loss(real) < g_nonsaturating_loss(fake)  # G gains when its fakes look real


def test_the_teachers_loss_teaches_the_generator_and_the_teacher_stays_as_it_is(tmp_path):
    trainer = make_trainer(tmp_path, lambda_clip=0.0)
    teacher_state = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    labels = torch.tensor([0, 1, 2, 0])
    latents = torch.randn(4, 16)
    optimizer = torch.optim.Adam(trainer.g.parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        fake, _ = trainer.g([latents], labels)
        loss = teacher_classification_loss(trainer.teacher, fake, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the fakes move towards their class as M_T sees it
    trainer.noise.reseed(0, 0)
    trainer.train_step(torch.randn(4, 3, 32, 32), labels)
    assert not trainer.teacher.training  # BatchNorm statistics never see fakes
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_the_fusion_layer_is_averaged_with_the_generator(tmp_path):
    trainer = make_trainer(tmp_path, lambda_clip=0.0)
    trainer.ema_decay = 0.75
    layer, average = trainer.fusion.project.weight, trainer.fusion_ema.project.weight
    before = average.clone()
    assert torch.equal(before, layer)  # the average starts at the layer
    trainer.noise.reseed(0, 0)
    trainer.train_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert not torch.equal(layer, before)  # the layer trained
    torch.testing.assert_close(average, 0.75 * before + 0.25 * layer.detach())
    assert not average.requires_grad and not trainer.fusion_ema.training


@pytest.mark.parametrize("lr_mul", [0.01, None])
def test_fusion_feature_term_keeps_its_scale_under_the_generators_adam(lr_mul):
    """Adam moves each weight by about the learning rate per step, so a plain Linear over
    16,384 non-negative features moves each output by about lr x their sum: the feature
    term would swamp the noise (at 256 px, with 262,144 features, after one step). The
    equalised layer's outputs stay at their initial scale."""
    torch.manual_seed(0)
    fusion = NoiseFusion(1024 * 4 * 4, 64, lr_mul=lr_mul)
    ratio = 4 / 5  # the generator's lazy-regularisation ratio at --g-reg-every 4
    optimizer = torch.optim.Adam(fusion.parameters(), lr=0.002 * ratio, betas=(0.0, 0.99 ** ratio))
    features = torch.relu(torch.randn(8, 1024, 4, 4))  # layer3 outputs are non-negative
    start = fusion.embed(features).pow(2).mean().sqrt()
    for _ in range(5):
        out = fusion.embed(features)
        (out * torch.randn_like(out)).sum().backward()  # gradients of any sign from the generator
        optimizer.step()
        optimizer.zero_grad()
    growth = fusion.embed(features).pow(2).mean().sqrt() / start
    if lr_mul:
        assert 0.9 < growth < 1.1
    else:
        assert growth > 10  # what the equalised layer prevents


def colour_batch(labels, generator):
    """Real images made for the trainer's tests: class c is the colour PALETTE[c] plus a
    little noise, in [-1, 1] at 32 px."""
    colours = torch.tensor([PALETTE[c] for c in labels.tolist()], dtype=torch.float32) / 127.5 - 1
    return (colours[:, :, None, None] + 0.1 * torch.randn(len(labels), 3, 32, 32, generator=generator)).clamp(-1, 1)


def train_on_colours(trainer, steps, generator):
    """`steps` train steps as fit takes them (reseeded from (seed, step)) on colour batches."""
    for _ in range(steps):
        labels = torch.randint(3, (4,), generator=generator)
        trainer.noise.reseed(trainer.cfg.seed, trainer.step)
        trainer.train_step(colour_batch(labels, generator), labels)
        trainer.step += 1


def adversarial_only(tmp_path):
    """A tiny trainer whose G learns from D alone (no M_T, CLIP or path-length term)."""
    return make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0, path_regularize=0.0)


def fixed_fakes(trainer, real, labels):
    """Fakes of the current G from the same noise at every call."""
    trainer.noise.reseed(1, 0)
    with torch.no_grad():
        _, features = trainer.teacher(real)
        fake, _ = trainer.generate(trainer.g_fused, len(labels), features, labels)
    return fake


def test_the_discriminator_learns_to_tell_the_real_colours_from_the_fakes(tmp_path):
    """D's real-minus-fake margin on a fixed batch grows over 30 steps (a reversed D loss
    drives it to -9)."""
    trainer = adversarial_only(tmp_path)
    data = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    real = colour_batch(labels, data)

    def margin():
        fake = fixed_fakes(trainer, real, labels)
        with torch.no_grad():
            return (trainer.d(real, labels).mean() - trainer.d(fake, labels).mean()).item()

    start = margin()
    train_on_colours(trainer, 30, data)
    assert margin() > start + 0.3  # -0.97 to 1.10 here; other seeds (data, noise, weights) gain 0.7 to 2.4


def test_a_generator_step_lowers_its_adversarial_loss_against_a_fixed_discriminator(tmp_path):
    """With D held still, G's steps lower softplus(-D(G(z))) on fixed inputs (a negated
    adversarial loss raises it)."""
    trainer = adversarial_only(tmp_path)
    trainer.d_optim.step = lambda: None  # D stays as it is: only G moves
    d_start = [p.clone() for p in trainer.d.parameters()]
    data = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    real = colour_batch(labels, data)

    def adversarial_loss():
        with torch.no_grad():
            return g_nonsaturating_loss(trainer.d(fixed_fakes(trainer, real, labels), labels)).item()

    start = adversarial_loss()
    train_on_colours(trainer, 10, data)
    assert all(torch.equal(a, b) for a, b in zip(d_start, trainer.d.parameters()))
    assert adversarial_loss() < start - 0.05  # 0.37 to 0.17 here; other seeds lose 0.12 to 0.39


def test_the_ema_generator_follows_the_generator_with_the_official_decay(tmp_path):
    assert make_trainer(tmp_path).ema_decay == pytest.approx(0.5 ** (32 / 10_000))  # rosinality's, at any batch
    trainer = make_trainer(tmp_path, lambda_clip=0.0, ema_half_life_kimg=0.064)  # decay 0.71: one step shows
    decay = trainer.ema_decay
    assert decay == pytest.approx(0.5 ** 0.5)
    start = {name: p.clone() for name, p in trainer.g_ema.named_parameters()}
    data = torch.Generator().manual_seed(0)
    train_on_colours(trainer, 2, data)
    before = {name: p.clone() for name, p in trainer.g_ema.named_parameters()}
    train_on_colours(trainer, 1, data)
    generator = dict(trainer.g.named_parameters())
    for name, average in trainer.g_ema.named_parameters():
        torch.testing.assert_close(average, decay * before[name] + (1 - decay) * generator[name].detach())
    moved = [name for name, p in trainer.g_ema.named_parameters() if not torch.equal(p, start[name])]
    assert "style.1.weight" in moved and "conv1.conv.weight" in moved


def test_each_fake_fuses_the_features_of_its_own_real_image(tmp_path, monkeypatch):
    """Changing real image 2 changes row 2, and no other row, of every latent a step fuses
    (D step, G step, path length) and of the sample grid's."""
    labels = torch.tensor([0, 1, 2, 0])
    real = colour_batch(labels, torch.Generator().manual_seed(0))
    changed = real.clone()
    changed[2] = colour_batch(torch.tensor([1]), torch.Generator().manual_seed(1))[0]

    def fused_latents(images):
        trainer = make_trainer(tmp_path, lambda_clip=0.0, path_batch_shrink=1)
        trainer.g_optim.step = lambda: None  # G's weights alike in both runs for every pass
        seen = []
        for generator in (trainer.g, trainer.g_ema):
            get_latent = generator.get_latent
            monkeypatch.setattr(generator, "get_latent", lambda z, labels, get_latent=get_latent: (
                seen.append(z.detach().clone()) or get_latent(z, labels)))
        trainer.noise.reseed(0, 0)
        trainer.train_step(images, labels)  # step 0: R1 and path length too
        trainer.write_samples(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), labels, images)
        return seen

    plain, perturbed = fused_latents(real), fused_latents(changed)
    assert len(plain) == len(perturbed) >= 4 and all(len(z) == 4 for z in plain)
    for a, b in zip(plain, perturbed):
        torch.testing.assert_close(a[[0, 1, 3]], b[[0, 1, 3]], rtol=0, atol=1e-6)
        assert (a[2] - b[2]).abs().max() > 1e-3


def test_the_sample_grid_is_written_as_save_image_wrote_it_by_a_thread_of_its_own(tmp_path, monkeypatch):
    """The grid's PNG is encoded while training goes on, and is the file save_image wrote."""
    import threading

    from torchvision.utils import save_image

    trainer = make_trainer(tmp_path, lambda_clip=0.0)
    rendered, writers = [], []
    forward = trainer.g_ema.forward
    monkeypatch.setattr(trainer.g_ema, "forward", lambda *a, **k: rendered.append(forward(*a, **k)) or rendered[-1])
    save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save",
                        lambda *a, **k: writers.append(threading.current_thread()) or save(*a, **k))
    labels = torch.tensor([0, 1, 2, 0])
    trainer.write_samples(torch.randn(4, 16), labels, colour_batch(labels, torch.Generator().manual_seed(0)))
    trainer.finish_samples()
    assert writers and threading.current_thread() not in writers
    save_image(rendered[0][0], tmp_path / "expected.png", nrow=trainer_module.SAMPLES_PER_CLASS, normalize=True,
               value_range=(-1, 1))
    with Image.open(tmp_path / "sample" / "000000.png") as written, Image.open(tmp_path / "expected.png") as expected:
        assert written.size == expected.size and np.array_equal(np.asarray(written), np.asarray(expected))


def test_a_sample_grid_that_cannot_be_written_stops_training_the_step_after(tmp_path, monkeypatch):
    """A full disk under the sample folder stops the run at once, not a --sample-every later."""
    import concurrent.futures
    import errno

    trainer = make_trainer(tmp_path, lambda_clip=0.0, iterations=6, sample_every=2, save_every=100, log_every=100)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    train_step = trainer.train_step

    def step_after_the_write(*args):
        if trainer.sample_write is not None:  # the thread has failed before the next step ends
            concurrent.futures.wait([trainer.sample_write])
        return train_step(*args)

    monkeypatch.setattr(trainer, "train_step", step_after_the_write)
    labels = torch.tensor([0, 1, 2, 0])
    images = colour_batch(labels, torch.Generator().manual_seed(0))
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(torch.utils.data.TensorDataset(images, labels), (torch.randn(4, 16), labels, images))
    assert trainer.step == 3  # the grid of step 2 failed


def test_training_runs_all_losses_and_resumes_exactly(cdtg_inputs):
    straight, interrupted = cdtg_inputs / "straight", cdtg_inputs / "interrupted"
    options = ("--augment", "--augment-p", "0.5", "--flip")
    train_main(tiny_train_args(cdtg_inputs, straight, "--iter", "4", *options))
    train_main(tiny_train_args(cdtg_inputs, interrupted, "--iter", "2", *options))
    killed_mid_save = interrupted / "checkpoint" / ".3.pt.h4_plxqd.tmp"  # as SIGKILL leaves it
    killed_mid_save.write_bytes(b"")
    stopped = torch.load(interrupted / "checkpoint" / "2.pt", weights_only=False)
    assert 0 < stopped["seconds"] < 1000
    torch.save({**stopped, "seconds": 1000.0}, interrupted / "checkpoint" / "2.pt")  # as after a long first call
    with (interrupted / "metrics.jsonl").open("a") as log:  # logged by a run killed before step 3's checkpoint
        log.write(json.dumps({"step": 3, "d": 0.0, "seconds": 1.0}) + "\n")
    train_main(tiny_train_args(cdtg_inputs, interrupted, "--iter", "4", *options, "--resume"))
    assert not killed_mid_save.exists()
    resumed = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4] and all(m["seconds"] > 1000 for m in resumed[2:])
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["ada_p"] == 0.5 for m in metrics)  # a fixed --augment-p stays fixed
    for key in ("d", "g_adv", "cls", "clip", "r1", "path"):
        assert key in metrics[0] and all(m[key] == m[key] for m in metrics if key in m)  # present, not NaN
    a, b = load_cdtg_checkpoint(straight / "checkpoint" / "4.pt"), load_cdtg_checkpoint(
        interrupted / "checkpoint" / "4.pt")
    for part in ("g", "d", "g_ema", "fusion", "fusion_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["class_ids"] == TAIL_IDS and a["prompts"][2] == "A photo of a golf field"
    assert isinstance(a["options"], dict) and a["generator_config"]["size"] == 32
    assert a["options"]["ada_every"] == 8 * 4  # 8 steps of --batch 4: the interval a resumed run keeps
    with Image.open(straight / "sample" / "000002.png") as grid:  # a row of 8 per tail class, 2 px apart
        assert grid.size == (8 * 34 + 2, len(TAIL_IDS) * 34 + 2)
    assert not torch.equal(a["fusion"]["project.weight"], load_cdtg_checkpoint(
        straight / "checkpoint" / "2.pt")["fusion"]["project.weight"])  # the fusion layer trains
    assert a["fusion_config"]["lr_mul"] == 0.01  # equalised, as --fusion-lr-mul's default


def test_real_images_are_flipped_only_with_the_flag(cdtg_inputs, monkeypatch):
    """The official CDTG trains on unflipped reals; --flip flips about half of them."""
    seen = []
    original = CdtgTrainer.train_step
    monkeypatch.setattr(CdtgTrainer, "train_step", lambda self, real, labels: seen.append(real) or original(
        self, real, labels))
    for name, extra in (("plain", ()), ("flipped", ("--flip",))):
        train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / name, "--iter", "2", "--clip", "none", *extra))
    plain, flipped = torch.cat(seen[:2]), torch.cat(seen[2:])
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(2), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < len(mirrored)


def test_resume_refuses_other_flags_and_another_fusion_layer(cdtg_inputs, capsys):
    out = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2"))
    capsys.readouterr()
    for flags, message in ((["--size", "64"], "was started with --size 32, this call has --size 64"),
                           (["--iter", "1"], "has already trained 2 steps; --iter 1 is fewer")):
        with pytest.raises(SystemExit):
            train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume", *flags))
        assert message in capsys.readouterr().err
    teacher = torch.load(cdtg_inputs / "M_T.pth")
    teacher["state_dict"]["conv1.weight"] += 0.01  # e.g. Distill.py continued and rewrote M_T.pth
    torch.save(teacher, cdtg_inputs / "M_T_changed.pth")
    args = tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume")
    args[args.index("--teacher") + 1] = str(cdtg_inputs / "M_T_changed.pth")
    with pytest.raises(SystemExit):
        train_main(args)
    assert "was trained with another teacher" in capsys.readouterr().err
    data = cdtg_inputs / "cdtg_data"
    original = {name: (data / name).read_text() for name in ("train.txt", "tail_classes.json")}
    for folder in ("data", "split", "cdtg_data"):
        shutil.copytree(cdtg_inputs / folder, cdtg_inputs / f"{folder}.kept")
    anno = cdtg_inputs / "data" / "anno" / "TOY_train.txt"
    anno.write_text(anno.read_text().replace("2/img 0.jpg 2\n", ""))  # one image fewer, the splits made again
    split_main(["--data-root", str(cdtg_inputs / "data"), "--out", str(cdtg_inputs / "split"), "--overwrite"])
    cdtg_split_main(["--split", str(cdtg_inputs / "split"), "--out", str(data), "--overwrite"])
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume"))
    assert "was trained on [8, 4, 4] images per tail class, --data has [7, 4, 4]" in capsys.readouterr().err
    for folder in ("data", "split", "cdtg_data"):
        shutil.rmtree(cdtg_inputs / folder)
        (cdtg_inputs / f"{folder}.kept").rename(cdtg_inputs / folder)
    (data / "tail_classes.json").write_text(original["tail_classes.json"].replace("A photo of a dam", "A dam"))
    with pytest.raises(SystemExit):  # the CLIP loss pulls towards the prompts
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume"))
    assert "the CLIP loss would change mid-run" in capsys.readouterr().err
    (data / "tail_classes.json").write_text(original["tail_classes.json"])
    (out / "options.json").unlink()  # without the run's flags, the checkpoint's copy of them
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume", "--fusion-lr-mul", "1"))
    assert "was started with --fusion-lr-mul 0.01, this call has --fusion-lr-mul 1.0" in capsys.readouterr().err
    state = torch.load(out / "checkpoint" / "2.pt", weights_only=False)
    del state["options"]  # as a checkpoint of an earlier version: the checkpoint's own check
    torch.save(state, out / "checkpoint" / "2.pt")
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume", "--fusion-lr-mul", "1"))
    assert "another noise-fusion layer" in capsys.readouterr().err
    assert not (out / "options.json").exists()  # a refused resume records none of its flags
    state = torch.load(out / "checkpoint" / "2.pt", weights_only=False)
    del state["g_optim"]  # as a checkpoint kept for generation only, or another tool's, would be
    torch.save(state, out / "checkpoint" / "3.pt")
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "3.pt holds no 'g_optim' to resume from (not a checkpoint of CDTG/train.py?)" in err
    (out / "checkpoint" / "3.pt").unlink()
    assert sorted(path.name for path in (out / "checkpoint").iterdir()) == ["2.pt"]


def test_resume_without_options_json_compares_the_flags_with_the_newest_checkpoints(cdtg_inputs, capsys):
    out = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2", "--clip", "none"))
    (out / "options.json").unlink()  # deleted, or lost when the run folder was copied
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "3", "--clip", "none", "--resume", "--seed", "5"))
    assert "was started with --seed 0, this call has --seed 5" in capsys.readouterr().err
    assert not (out / "options.json").exists()
    train_main(tiny_train_args(cdtg_inputs, out, "--iter", "3", "--clip", "none", "--resume", "--log-every", "2"))
    assert json.loads((out / "options.json").read_text())["log_every"] == 2  # how it runs may change
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the last step is logged, whatever --log-every


def test_resume_alone_keeps_the_runs_steps_checkpoints_and_clip_file(cdtg_inputs, capsys, monkeypatch):
    """--resume alone: the run's --iter, its --keep-full 0 (the default 2 would cut its older
    checkpoints for good) and --save-every, and its --clip file named from another folder."""
    run = cdtg_inputs / "run"
    monkeypatch.chdir(cdtg_inputs)
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--keep-full", "0", "--save-every", "1",
                               "--clip", "clip.pt"))  # relative to this folder
    monkeypatch.chdir(run)
    capsys.readouterr()
    train_main(["--out", str(run), "--resume", "--workers", "0", "--device", "cpu"])
    said = capsys.readouterr().out
    assert "--iter 2" in said and "--keep-full 0" in said and f"--clip {cdtg_inputs / 'clip.pt'}" in said
    assert checkpoint_steps(run / "checkpoint") == [1, 2]  # no step trained beyond the run's --iter
    train_main(["--out", str(run), "--resume", "--workers", "0", "--device", "cpu", "--iter", "3"])
    assert checkpoint_steps(run / "checkpoint") == [1, 2, 3]
    assert not any(load_cdtg_checkpoint(run / "checkpoint" / f"{step}.pt").get("generation_only") for step in (1, 2))


def test_resume_compares_ada_and_clip_flags_only_where_they_act(tmp_path):
    """ADA's flags act only with --augment, CLIP's only with the CLIP loss; --clip may name
    the model's file anywhere; what is logged and kept may change, the seed may not."""
    from argparse import Namespace

    from CDTG.config import RESUME_MAY_CHANGE, resume_view
    from tgn.resume import check_resume
    from tgn.run_folder import save_options

    def resumed(saved, **changes):
        save_options(tmp_path, Namespace(**saved))
        check_resume(tmp_path, Namespace(**{**saved, **changes}), done=1, length="iter",
                     may_change=RESUME_MAY_CHANGE, compared=resume_view)

    start = dict(iter=2, resume=True, seed=0, augment=False, ada_target=0.6, clip="ViT-B/32", lambda_clip=1.0,
                 save_every=5000)
    resumed(start, ada_target=0.8, clip=str(tmp_path / "ViT-B-32.pt"), save_every=10, iter=3)
    resumed({**start, "clip": "none"}, clip="ViT-B/32", lambda_clip=0.0)  # no CLIP loss either way
    for saved, changes, message in (
            ({**start, "augment": True}, {"ada_target": 0.8}, "started with --ada-target 0.6, this call has "
                                                               "--ada-target 0.8;"),
            (start, {"clip": "none"}, "started with --clip ViT-B/32, this call has --clip none;"),
            (start, {"lambda_clip": 0.5}, "started with --lambda-clip 1.0, this call has --lambda-clip 0.5;"),
            (start, {"seed": 1}, "started with --seed 0, this call has --seed 1;")):
        with pytest.raises(UserError, match=re.escape(message)):
            resumed(saved, **changes)


def test_a_run_with_clip_weight_0_resumes_with_or_without_clip(cdtg_inputs, capsys):
    """With --lambda-clip 0 no CLIP is loaded: a machine without its file may resume the run
    with --clip none, and one with it with the file again; a run with the CLIP loss may not."""
    run, copy = cdtg_inputs / "run", cdtg_inputs / "copy"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--lambda-clip", "0"))
    shutil.copytree(run, copy)
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "3", "--clip", "none", "--resume"))
    train_main(tiny_train_args(cdtg_inputs, copy, "--iter", "3", "--lambda-clip", "0", "--resume"))
    without_file, with_file = (load_cdtg_checkpoint(folder / "checkpoint" / "3.pt") for folder in (run, copy))
    assert all(same_weights(without_file[part], with_file[part]) for part in ("g", "d", "g_ema", "fusion"))
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "4", "--lambda-clip", "0", "--resume"))  # and back
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the CLIP loss turned on mid-run
        train_main(tiny_train_args(cdtg_inputs, run, "--iter", "5", "--lambda-clip", "1", "--resume"))
    assert "was started with --lambda-clip 0.0, this call has --lambda-clip 1.0" in capsys.readouterr().err
    with_loss = cdtg_inputs / "with_loss"
    train_main(tiny_train_args(cdtg_inputs, with_loss, "--iter", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, with_loss, "--iter", "2", "--clip", "none", "--lambda-clip", "0",
                                   "--resume"))
    assert "this call has --clip none, --lambda-clip 0.0;" in capsys.readouterr().err


def test_teacher_with_wrong_class_count_is_refused(cdtg_inputs, capsys):
    teacher = FeatureResNet("resnet18", num_classes=5, width=4)
    torch.save(teacher.state_dict(), cdtg_inputs / "wrong.pth")
    args = tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1")
    args[args.index("--teacher") + 1] = str(cdtg_inputs / "wrong.pth")
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2 and "has 5 classes, the tail data has 3" in capsys.readouterr().err


def test_the_clip_loss_refuses_prompts_made_of_class_ids(cdtg_inputs, capsys):
    """DATA without classes.json names its classes by id: CLIP would pull the fakes towards
    'A photo of a 2'. Without the CLIP loss, or with the prompts written, it trains."""
    from CDTG.dataset_split import main as cdtg_split_main
    from KMDN.dataset_split import main as split_main

    (cdtg_inputs / "data" / "classes.json").unlink()
    with pytest.warns(UserWarning, match="named by id"):
        split_main(["--data-root", str(cdtg_inputs / "data"), "--out", str(cdtg_inputs / "split-ids")])
        cdtg_split_main(["--split", str(cdtg_inputs / "split-ids"), "--out", str(cdtg_inputs / "cdtg_data"),
                         "--overwrite"])
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1"))
    assert "tail class 2 is named '2', so its CLIP prompt reads 'A photo of a 2'" in capsys.readouterr().err
    assert not (cdtg_inputs / "run").exists()
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "no-clip", "--iter", "1", "--clip", "none"))
    manifest = cdtg_inputs / "cdtg_data" / "tail_classes.json"
    written = json.loads(manifest.read_text())
    for cls in written["classes"]:
        cls["prompt"] = f"A photo of a {({2: 'airport', 3: 'dam', 4: 'golf field'})[cls['id']]}"
    manifest.write_text(json.dumps(written))
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1"))


def test_a_number_for_a_name_is_refused_whatever_the_class_id():
    """Class folders numbered 1..N are classes 0..N-1 named '1'..'N': 'A photo of a 1' too."""
    from CDTG.tail_data import TailClasses, check_prompts_name_classes

    def tail(name, prompt):
        return TailClasses("t", ".", [{"label": 0, "id": 0, "name": name, "prompt": prompt, "train_count": 3}])

    with pytest.raises(UserError, match="tail class 0 is named '1', so its CLIP prompt reads 'A photo of a 1'"):
        check_prompts_name_classes(tail("1", "A photo of a 1"))
    check_prompts_name_classes(tail("1", "A photo of a harbour crane"))  # its prompt written by hand
    check_prompts_name_classes(tail("Boeing 747", "A photo of a Boeing 747"))


def test_prompts_outside_the_latin_alphabet_are_warned_of():
    from CDTG.tail_data import TailClasses, check_prompts_name_classes

    def tail(*names):
        return TailClasses("t", ".", [{"label": k, "id": k, "name": name, "prompt": f"A photo of a {name}",
                                       "train_count": 3} for k, name in enumerate(names)])

    with pytest.warns(UserWarning, match="prompts of 2 tail classes hold letters outside the Latin alphabet "
                                         "\\(e.g. 'A photo of a 储油罐'\\).* English names in the prompts of"):
        check_prompts_name_classes(tail("储油罐", "ship", "Корабль"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts_name_classes(tail("café terrace", "Boeing 747", "Ålesund ferry"))  # Latin letters


def test_the_loss_and_fusion_flags_reach_the_training_config():
    defaults = GanConfig()
    given = {"lambda_cls": 0.3, "lambda_clip": 0.7, "fusion_noise": 0.6, "r1": 4.5}
    assert all(getattr(defaults, field) != value for field, value in given.items())  # a dropped flag shows
    argv = [item for field, value in given.items() for item in ("--" + field.replace("_", "-"), str(value))]
    cfg = gan_config(build_parser().parse_args(argv))
    assert {field: getattr(cfg, field) for field in given} == given
    assert gan_config(build_parser().parse_args([*argv, "--clip", "none"])).lambda_clip == 0.0  # no CLIP, no loss


def test_the_model_flags_reach_the_models(cdtg_inputs):
    run = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none", "--channel-multiplier", "1",
                               "--lr-mlp", "0.05"))
    checkpoint = load_cdtg_checkpoint(run / "checkpoint" / "1.pt")
    assert checkpoint["generator_config"]["channel_multiplier"] == 1  # defaults: 2 and 0.01
    assert checkpoint["generator_config"]["lr_mlp"] == 0.05
    assert checkpoint["discriminator_config"]["channel_multiplier"] == 1


@pytest.fixture
def trained_ckpt(cdtg_inputs):
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "2", "--clip", "none"))
    return cdtg_inputs / "run" / "checkpoint" / "2.pt"


def read_anno(folder):
    return [line.rsplit(" ", 1) for line in (folder / "anno.txt").read_text().splitlines()]


def test_generation_writes_images_under_dataset_class_ids(trained_ckpt, tmp_path, monkeypatch):
    import CDTG.synthesis

    hashed = []
    fingerprint = CDTG.synthesis.weights_fingerprint
    monkeypatch.setattr(CDTG.synthesis, "weights_fingerprint", lambda model: hashed.append(model) or fingerprint(model))
    out = tmp_path / "generated"
    generation_main(["--ckpt", str(trained_ckpt), "--out", str(out), "--per-class", "5", "--batch", "2",
                     "--device", "cpu", "--workers", "2"])
    lines = read_anno(out)
    assert len(lines) == 15
    assert sorted({int(label) for _, label in lines}) == TAIL_IDS
    for relpath, label in lines:
        assert relpath.split("/")[0] == label
        with Image.open(out / relpath) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert sum(isinstance(model, FeatureResNet) for model in hashed) == 1  # checked and recorded: hashed once


def test_full_decode_reaches_training_and_the_generation_of_its_checkpoints(cdtg_inputs, trained_ckpt, tmp_path,
                                                                            monkeypatch):
    """CDTG/train.py --full-decode decodes the real images whole; generation decodes them
    (for the fused features) as the checkpoint's run did, the default run in draft mode."""
    sizes = decode_sizes(monkeypatch)
    run = tmp_path / "whole"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--clip", "none", "--full-decode"))
    assert len(sizes) >= 8 and set(sizes) == {None}
    from CDTG.evaluate import main as evaluate_main

    for ckpt, size in ((run / "checkpoint" / "2.pt", None), (trained_ckpt, 32)):
        sizes.clear()
        generation_main(["--ckpt", str(ckpt), "--out", str(tmp_path / f"gen-{size}"), "--per-class", "1",
                         "--device", "cpu"])
        assert len(sizes) == 16 and set(sizes) == {size}
        settings = json.loads((tmp_path / f"gen-{size}" / "generation.json").read_text())
        assert settings["decode"] == ("full" if size is None else "draft")
        sizes.clear()  # evaluate.py decodes the real images as the folder's generation did
        evaluate_main([str(tmp_path / f"gen-{size}"), "--clip", "none", "--lpips", "none", "--inception", "none",
                       "--teacher", "none", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / f"ev-{size}")])
        assert len(sizes) == 16 + 3 and set(sizes) == {size}


def test_generation_takes_every_seed_the_flag_allows(trained_ckpt, tmp_path):
    """Per-image seeds grow past 64 bits from --seed 18,446,633 (a date like 20240517 does)."""
    from CDTG.synthesis import image_seed

    assert image_seed(18_446_632, 4, 999) == (18_446_632 * 1_000_003 + 4) * 1_000_003 + 999  # as before
    out = tmp_path / "generated"
    for seed in ("20240517", str(2**32 - 1)):
        generation_main(["--ckpt", str(trained_ckpt), "--out", str(out / seed), "--per-class", "1", "--classes", "3",
                         "--seed", seed, "--device", "cpu"])
    first, last = (np.asarray(Image.open(out / seed / "3" / "gen_000000.jpg")) for seed in ("20240517", str(2**32 - 1)))
    assert not np.array_equal(first, last)


def test_generation_restarts_and_adds_without_overwriting(trained_ckpt, tmp_path):
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    common = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--classes", "3"]
    generation_main([*common, "--out", str(straight), "--per-class", "6", "--batch", "4"])
    generation_main([*common, "--out", str(restarted), "--per-class", "3", "--batch", "2"])
    (restarted / "3" / "gen_000001.jpg").unlink()  # as if killed before publishing its batch:
    (restarted / "3" / ".gen_000001.jpg.k2x9_q.tmp").write_bytes(b"\xff\xd8 half")  # its temp file stays
    mtime = (restarted / "3" / "gen_000000.jpg").stat().st_mtime_ns
    generation_main([*common, "--out", str(restarted), "--per-class", "6", "--batch", "3"])
    assert (restarted / "3" / "gen_000000.jpg").stat().st_mtime_ns == mtime  # not rewritten
    names = sorted(p.name for p in (restarted / "3").iterdir())
    assert names == [f"gen_{i:06d}.jpg" for i in range(6)]
    for name in names:  # same images whatever the batch size and interruptions
        assert (straight / "3" / name).read_bytes() == (restarted / "3" / name).read_bytes()
    assert len(read_anno(restarted)) == 6


def test_one_tail_class_is_warned_that_the_guidance_losses_vanish(cdtg_inputs):
    from CDTG.dataset_split import main as cdtg_split_main
    from KMDN.dataset_split import main as split_main
    from tgn.io import atomic_torch_save

    with pytest.warns(UserWarning, match="tail group has one class"):
        split_main(["--data-root", str(cdtg_inputs / "data"), "--out", str(cdtg_inputs / "split1"), "--threshold", "80"])
    cdtg_split_main(["--split", str(cdtg_inputs / "split1"), "--out", str(cdtg_inputs / "cdtg_data"), "--overwrite"])
    teacher = FeatureResNet("resnet18", num_classes=1, width=4)
    atomic_torch_save(cdtg_inputs / "M_T.pth", {"state_dict": teacher.state_dict(), "model_config": teacher.config,
                                                "class_ids": [4], "class_names": ["golf field"]})
    with pytest.warns(UserWarning, match="one tail class: its classifier and CLIP losses are 0"):
        train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1"))
    metrics = json.loads((cdtg_inputs / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["cls"] == 0 and metrics["clip"] == 0  # what the warning says


def test_resume_refuses_another_clip_model(cdtg_inputs, capsys):
    run = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1"))
    other = tiny_clip()
    with torch.no_grad():
        other.logit_scale += 1  # another CLIP: one weight differs
    torch.save(other.state_dict(), cdtg_inputs / "other_clip.pt")
    argv = tiny_train_args(cdtg_inputs, run, "--iter", "2", "--resume")
    argv[argv.index("--clip") + 1] = str(cdtg_inputs / "other_clip.pt")
    with pytest.raises(SystemExit):
        train_main(argv)
    assert "1.pt was trained with another CLIP model (its weights differ from --clip's)" in capsys.readouterr().err
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--resume"))  # the same CLIP from another file name


def test_generation_reads_the_images_training_read(cdtg_inputs, tmp_path):
    copy = cdtg_inputs / "copy"
    shutil.copytree(cdtg_inputs / "data", copy)
    next((copy / "train" / "3").iterdir()).write_bytes(b"not a JPEG")
    run = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "1", "--clip", "none", "--data-root", str(copy),
                               "--skip-bad-images"))
    trained_on = load_cdtg_checkpoint(run / "checkpoint" / "1.pt")["train_counts"]
    common = ["--ckpt", str(run / "checkpoint" / "1.pt"), "--device", "cpu", "--per-class", "2", "--skip-bad-images"]
    generation_main([*common, "--out", str(tmp_path / "gen")])  # the copy, which training read, not the tail data's
    real = json.loads((tmp_path / "gen" / "generation.json").read_text())["real_images"]
    assert [real[str(cid)] for cid in TAIL_IDS] == trained_on and trained_on[1] == 3  # the tail data's has 4


def test_generation_names_the_flag_for_a_recorded_path_that_is_gone(trained_ckpt, tmp_path, capsys):
    (trained_ckpt.parents[2] / "cdtg_data").rename(trained_ckpt.parents[2] / "moved")  # moved with its run folder
    with pytest.raises(SystemExit):
        generation_main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--out", str(tmp_path / "gen")])
    assert capsys.readouterr().err.strip() == (f"error: the tail data {trained_ckpt.parents[2] / 'cdtg_data'}, "
                                               f"recorded in {trained_ckpt}, is gone (moved with its run folder?): "
                                               "pass --data")


def test_a_generation_stopped_midway_is_refused_by_extra_until_finished(trained_ckpt, tmp_path, monkeypatch,
                                                                       capsys):
    from Classification.samples import read_extra

    out = tmp_path / "gen"
    argv = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--per-class", "2", "--batch", "1", "--out", str(out)]
    render, calls = TailSynthesizer.render, []

    def stopped_within_the_second_class(self, class_id, *args, **kwargs):
        calls.append(class_id)
        if len(set(calls)) == 2 and calls.count(class_id) == 2:
            raise KeyboardInterrupt  # Ctrl-C with the first class listed in anno.txt, the second begun
        return render(self, class_id, *args, **kwargs)

    monkeypatch.setattr(TailSynthesizer, "render", stopped_within_the_second_class)
    with pytest.raises(SystemExit):
        generation_main(argv)
    assert len(read_anno(out)) == 2  # a readable list of part of the classes
    names = {0: "ship", 1: "vehicle", 2: "airport", 3: "dam", 4: "golf field"}
    with pytest.raises(UserError, match="its generation has not finished .*run CDTG/generation.py again"):
        read_extra(out, names)
    monkeypatch.setattr(TailSynthesizer, "render", render)
    marker = json.loads((out / "generation.unfinished").read_text())
    begun, untouched = marker["classes"]
    assert calls[0] not in marker["classes"] and marker["targets"] == {str(begun): 2, str(untouched): 2}
    assert len(list((out / str(begun)).glob("*.jpg"))) == 1
    # A run of one class finishes that class only; one the stopped run never began takes its count.
    generation_main([*argv[:6], "--per-class", "1", "--classes", str(untouched), "--out", str(out)])
    assert json.loads((out / "generation.unfinished").read_text()) == {"classes": [begun], "targets": {str(begun): 2}}
    assert f"note: a stopped run left classes {begun} (2 images) unfinished" in capsys.readouterr().out
    with pytest.raises(UserError, match="its generation has not finished"):
        read_extra(out, names)
    # Asking fewer does not finish the class the stopped run began: it would stay half as large.
    generation_main([*argv[:6], "--per-class", "1", "--out", str(out)])
    assert json.loads((out / "generation.unfinished").read_text()) == {"classes": [begun], "targets": {str(begun): 2}}
    assert (f"note: a stopped run left classes {begun} (2 images) unfinished: generation.unfinished stays, and the "
            "folder is not used, until a run generates them (with --per-class 2") in capsys.readouterr().out
    generation_main(argv)
    assert len(read_extra(out, names)) == 6
    # A damaged generation.json stops both stages in one line: skipping it skipped their checks.
    settings = (out / "generation.json").read_text()
    (out / "generation.json").write_text(settings[:len(settings) // 2])
    damaged = f"generation settings {out / 'generation.json'} is not valid JSON"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generation_main(argv)
    assert capsys.readouterr().err.startswith(f"error: {damaged}")
    with pytest.raises(UserError, match=re.escape(damaged)):
        read_extra(out, names)
    (out / "generation.json").write_text("[]")
    with pytest.raises(UserError, match="hold no settings"):
        read_extra(out, names)


def test_the_mark_of_a_stopped_generation_goes_with_overwrite_and_keeps_tail_classes_only(trained_ckpt, tmp_path):
    out = tmp_path / "gen"
    argv = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--per-class", "1", "--out", str(out)]
    generation_main([*argv, "--classes", "3"])
    (out / "generation.unfinished").write_text(json.dumps({"classes": [99]}))  # of another checkpoint's tail
    generation_main([*argv, "--classes", "3"])
    assert not (out / "generation.unfinished").exists()
    (out / "generation.unfinished").write_text(json.dumps({"classes": [4]}))  # a stopped run's class
    generation_main([*argv, "--classes", "3", "--overwrite"])  # the stopped run's images are gone: so is its mark
    assert not (out / "generation.unfinished").exists()


def test_overwrite_removes_every_old_image_or_says_what_it_cannot_remove(trained_ckpt, tmp_path, monkeypatch, capsys):
    """An old image left in a class folder would be counted as generated (the folder would
    mix two runs): a class folder that is a link goes (not what it points to), and one that
    cannot be removed (Windows: a file held open) stops the run in one line."""
    import CDTG.generated_folder

    out = tmp_path / "gen"
    argv = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--per-class", "2", "--out", str(out)]
    generation_main(argv)
    [cid, *_] = sorted(path.name for path in out.iterdir() if path.is_dir())
    elsewhere = tmp_path / "elsewhere"
    (out / cid).rename(elsewhere)
    (out / cid).symlink_to(elsewhere, target_is_directory=True)
    before = sorted(path.read_bytes() for path in elsewhere.iterdir())
    generation_main([*argv, "--seed", "1", "--overwrite"])
    assert (out / cid).is_dir() and not (out / cid).is_symlink()
    assert sorted(path.read_bytes() for path in elsewhere.iterdir()) == before  # what the link pointed to stays
    assert sorted(path.read_bytes() for path in (out / cid).iterdir()) != before  # --seed 1's images

    def held_open(path):
        raise PermissionError(13, "The process cannot access the file", str(path / "gen_000000.jpg"))

    monkeypatch.setattr(CDTG.generated_folder, "remove_path", held_open)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generation_main([*argv, "--overwrite"])
    assert capsys.readouterr().err.strip() == (
        f"error: --overwrite: cannot remove {out / cid / 'gen_000000.jpg'} (The process cannot access the file); "
        "remove it yourself (or close what holds it open), then run again")


def test_the_real_images_are_named_alike_in_the_fingerprint_on_windows(trained_ckpt, monkeypatch):
    """A generated folder made on one system extends on another (generation.json compares it)."""
    import ntpath
    import pathlib

    import CDTG.synthesis

    here = TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu")).real_features_fingerprint()
    monkeypatch.setattr(CDTG.synthesis.os.path, "relpath", ntpath.relpath)  # 'train\\2\\img 0.jpg'
    monkeypatch.setattr(CDTG.synthesis, "PurePath", pathlib.PureWindowsPath)
    assert TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu")).real_features_fingerprint() == here


def test_cdtg_writes_nothing_into_the_dataset(cdtg_inputs, trained_ckpt, capsys):
    data = cdtg_inputs / "data"
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, data / "anno" / "run", "--iter", "2", "--clip", "none"))
    assert f"--out {data / 'anno' / 'run'} is the dataset folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generation_main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--per-class", "1", "--out",
                         str(data / "train" / "gen")])
    assert f"--out {data / 'train' / 'gen'} is the dataset folder" in capsys.readouterr().err
    assert not (data / "anno" / "run").exists() and not (data / "train" / "gen").exists()


def test_generation_takes_a_class_given_twice_once(trained_ckpt, tmp_path, capsys):
    generation_main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--classes", "3", "3", "--per-class", "2",
                     "--out", str(tmp_path / "gen")])
    out = capsys.readouterr().out
    assert re.search(r"wrote 2 images in \d+\.\d s \([\d,]+ images/s over 1 process\(es\)\)", out), out
    assert out.count(" dam ") == 1, out
    assert len(read_anno(tmp_path / "gen")) == 2


def test_generation_uses_the_averaged_fusion_layer(trained_ckpt, tmp_path):
    checkpoint = load_cdtg_checkpoint(trained_ckpt)
    average = checkpoint["fusion_ema"]["project.weight"]
    assert not torch.equal(average, checkpoint["fusion"]["project.weight"])
    synth = TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu"))
    assert torch.equal(synth.fusion.project.weight, average)
    del checkpoint["fusion_ema"]  # a checkpoint of an earlier version: the layer itself
    torch.save(checkpoint, tmp_path / "earlier.pt")
    synth = TailSynthesizer.from_checkpoint(tmp_path / "earlier.pt", torch.device("cpu"))
    assert torch.equal(synth.fusion.project.weight, checkpoint["fusion"]["project.weight"])


def test_generation_mixes_noise_and_feature_by_r(trained_ckpt):
    synth = TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu"))
    z, real, noise = synth.batch_inputs(3, [0, 1, 2, 3], seed=0)
    other_real = (real + 1) % synth.num_real(3)

    def images(ratio, z=z, real=real):
        return synth.render(3, (z, real, noise), ratio=ratio).numpy().astype(int)

    assert (images(1.0) == images(1.0, real=other_real)).all()  # r = 1: noise alone
    assert (images(0.0) == images(0.0, z=torch.randn_like(z))).all()  # r = 0: the feature alone
    assert np.abs(images(0.05) - images(0.05, real=other_real)).max() > 10  # r = 0.05: mostly the feature


def test_generation_renders_each_class_with_its_label_and_its_own_real_images(cdtg_inputs):
    """Each image is g_ema(get_latent(r * z + (1 - r) * embed(M_T feature of a real image
    of its class), its label)), computed here from the images in train/<class id>/."""
    tail = load_tail_classes(cdtg_inputs / "cdtg_data")
    teacher = load_teacher(cdtg_inputs / "M_T.pth", tail)
    torch.manual_seed(0)
    g_ema = Generator(32, 16, 2, num_classes=3, channel_max=16)
    channels, height, width = teacher.feature_shape(32)
    fusion = NoiseFusion(channels * height * width, 16, lr_mul=0.01)
    synth = TailSynthesizer(g_ema, fusion, teacher, tail, torch.device("cpu"))
    ratio, indices = 0.05, [0, 1, 2, 3]
    samples = synth.dataset.samples
    for label, class_id in enumerate(TAIL_IDS):
        own = [i for i, (path, _) in enumerate(samples) if Path(path).parent.name == str(class_id)]
        assert {samples[i][1] for i in own} == {label} and synth.num_real(class_id) == len(own)
        with torch.no_grad():
            _, features = teacher(torch.stack([synth.dataset[i][0] for i in own]))
            z, real, noise = synth.batch_inputs(class_id, indices, seed=0)
            labels = torch.full((len(indices),), label)
            styles = g_ema.get_latent(ratio * z + (1 - ratio) * fusion.embed(features)[real], labels)
            images, _ = g_ema([styles], labels, noise=synth.noise_maps(noise), input_is_latent=True)
        expected = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        generated = synth.generate(class_id, indices, ratio=ratio, seed=0, batch_size=len(indices))
        assert np.abs(generated.astype(int) - expected.astype(int)).max() <= 1, class_id


def test_every_batch_is_rendered_with_the_batch_size_whoever_shares_it(trained_ckpt, monkeypatch):
    """A kernel's rounding depends on the batch's shape: a short batch is padded, so an image
    is the same whether it came last in a run, in one process of several, or in a folder
    extended later."""
    synth = TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu"))
    shapes, get_latent = [], synth.g_ema.get_latent
    monkeypatch.setattr(synth.g_ema, "get_latent", lambda z, labels: shapes.append(len(z)) or get_latent(z, labels))
    first = synth.render(3, synth.batch_inputs(3, [0, 1, 2, 3], seed=0), ratio=0.05, batch_size=4)
    last = synth.render(3, synth.batch_inputs(3, [2, 3], seed=0), ratio=0.05, batch_size=4)
    assert shapes == [4, 4] and last.shape[0] == 2
    assert torch.equal(last, first[2:])


def test_each_image_draws_its_inputs_from_its_own_seed_in_a_fixed_order(trained_ckpt):
    """The order of draws defines every generated image: changing it would give folders
    written by earlier versions other images under the same settings."""
    from CDTG.synthesis import image_seed
    synth = TailSynthesizer.from_checkpoint(trained_ckpt, torch.device("cpu"))
    num_real = synth.num_real(3)
    indices = [7, 0, 12]
    z, real, noise = synth.batch_inputs(3, indices, seed=4)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(image_seed(4, 3, index))
        assert torch.equal(z[row], torch.randn(synth.latent_dim, generator=generator))
        assert real[row] == torch.randint(num_real, (1,), generator=generator)
        for layer, shape in zip(synth.noise_maps(noise), synth.g_ema.noise_shapes()):  # map after map
            assert torch.equal(layer[row:row + 1], torch.randn(1, *shape[1:], generator=generator))


def test_one_draw_for_all_noise_maps_equals_map_after_map_at_the_papers_size():
    """Generation draws an image's noise maps in one call, which torch's CPU sampler makes
    equal to one call per map (the order earlier versions drew in) when every map's size is
    a multiple of 16, as at 256 px."""
    shapes = Generator(256, 16, 1, num_classes=2, channel_max=16).noise_shapes()
    assert shapes[-1][-1] == 128 and all(math.prod(shape) % 16 == 0 for shape in shapes)
    one_call = torch.randn(sum(math.prod(shape) for shape in shapes), generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    assert torch.equal(one_call, torch.cat([torch.randn(shape, generator=generator).flatten() for shape in shapes]))


def test_generation_checks_every_real_image_first_and_can_skip_unreadable_ones(trained_ckpt, tmp_path, capsys):
    """A run trained with --skip-bad-images can generate (with the same flag); without it an
    unreadable tail image stops generation before any folder is written."""
    tail = load_tail_classes(trained_ckpt.parents[2] / "cdtg_data")
    last = Path([path for path, label in tail.samples() if label == 2][-1])  # class id 4's, generated last
    last.write_bytes(last.read_bytes()[:300])
    out = tmp_path / "generated"
    base = ["--ckpt", str(trained_ckpt), "--out", str(out), "--per-class", "2", "--device", "cpu"]
    with pytest.raises(SystemExit):
        generation_main(base)
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    generation_main([*base, "--skip-bad-images"])
    settings = json.loads((out / "generation.json").read_text())
    assert settings["real_images"] == {"2": 8, "3": 4, "4": 3}  # class 4 without its unreadable image
    assert settings["class_names"] == {"2": "airport", "3": "dam", "4": "golf field"}  # checked by --extra
    assert len(read_anno(out)) == 6


def test_generation_refuses_images_of_other_weights_under_the_same_checkpoint_name(trained_ckpt, tmp_path, capsys):
    copy = tmp_path / "G.pt"
    shutil.copyfile(trained_ckpt, copy)
    base = ["--ckpt", str(copy), "--out", str(tmp_path / "generated"), "--device", "cpu"]
    generation_main([*base, "--per-class", "1"])
    train_main(tiny_train_args(trained_ckpt.parents[2], trained_ckpt.parents[1], "--iter", "4", "--clip", "none",
                               "--resume"))
    shutil.copyfile(trained_ckpt.parent / "4.pt", copy)  # retrained, same name
    with pytest.raises(SystemExit):
        generation_main([*base, "--per-class", "2"])
    assert "other settings (weights)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # psi above 1 would be ignored, yet recorded
        generation_main([*base, "--truncation", "1.5"])
    assert "--truncation" in capsys.readouterr().err


def test_generation_refuses_other_settings_in_the_same_folder(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "generated"
    base = ["--ckpt", str(trained_ckpt), "--out", str(out), "--per-class", "1", "--device", "cpu"]
    generation_main(base)
    with pytest.raises(SystemExit):
        generation_main([*base, "--r", "0.5"])
    assert "other settings (r)" in capsys.readouterr().err
    generation_main([*base, "--r", "0.5", "--overwrite"])


@pytest.mark.skipif(not can_load_classes(), reason="the official options need torch 2.4 or later (next test)")
def test_official_checkpoint_loads_and_generates(cdtg_inputs, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    g = Generator(32, 16, 2, num_classes=3)  # official widths: the official file records no channel cap
    d = Discriminator(32, 3, label_dim=16)
    official = {"g": g.state_dict(), "d": d.state_dict(), "g_ema": g.state_dict(), "g_optim": {}, "d_optim": {},
                "ada_aug_p": 0.0, "args": argparse.Namespace(size=32, channel_multiplier=2, iter=2, batch=4)}
    torch.save(official, tmp_path / "200000.pt")
    loaded = load_cdtg_checkpoint(tmp_path / "200000.pt")
    assert loaded["official"] and loaded["fusion"] is None
    assert loaded["generator_config"] == {"size": 32, "style_dim": 16, "n_mlp": 2, "num_classes": 3,
                                          "channel_multiplier": 2}
    out = tmp_path / "generated"
    base = ["--ckpt", str(tmp_path / "200000.pt"), "--out", str(out), "--device", "cpu", "--per-class", "2"]
    with pytest.raises(SystemExit):  # it records neither the tail data nor the teacher
        generation_main(base)
    sizes = decode_sizes(monkeypatch)
    inputs = ["--data", str(cdtg_inputs / "cdtg_data"), "--teacher", str(cdtg_inputs / "M_T.pth")]
    with pytest.warns(UserWarning, match="no noise-fusion weights"):
        generation_main([*base, *inputs])
    assert len(read_anno(out)) == 6
    assert len(sizes) == 16 and set(sizes) == {None}  # the real images decoded whole, as the official code did
    # A folder an earlier version generated from it decoded them in draft mode: not mixed.
    settings = json.loads((out / "generation.json").read_text())
    del settings["decode"]
    (out / "generation.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert "holds images generated with other settings (decode)" in exit_message(
        capsys, generation_main, [*base[:-1], "4", *inputs])


def test_official_checkpoint_on_a_torch_that_cannot_allow_its_options_is_one_line(tmp_path, monkeypatch):
    """Before torch 2.4 weights_only loading cannot be allowed the official argparse.Namespace
    (simulated here; the real case was run on torch 2.1.2)."""
    import contextlib

    import CDTG.checkpoint as checkpoint_module

    torch.save({"g_ema": {"w": torch.zeros(1)}, "args": argparse.Namespace(size=32)}, tmp_path / "200000.pt")
    monkeypatch.setattr(checkpoint_module, "can_load_classes", lambda: False)
    monkeypatch.setattr(checkpoint_module, "loading_classes", lambda classes: contextlib.nullcontext())
    with pytest.raises(UserError, match=r"official format\), which torch .* cannot load .*use torch 2.4 or later"):
        load_cdtg_checkpoint(tmp_path / "200000.pt")


def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(cdtg_inputs, capsys):
    run = cdtg_inputs / "diverging"
    with pytest.raises(SystemExit) as stopped:  # losses are read every 3 steps, and at each save
        train_main(tiny_train_args(cdtg_inputs, run, "--iter", "12", "--lr", "1e9", "--clip", "none",
                                   "--log-every", "3", "--save-every", "4"))
    assert stopped.value.code == 2
    assert "loss became" in capsys.readouterr().err
    for path in (run / "checkpoint").glob("*.pt"):
        state = load_cdtg_checkpoint(path)
        assert all(torch.isfinite(value).all() for value in state["g"].values() if value.is_floating_point())


def test_older_checkpoints_are_cut_to_what_generation_reads(cdtg_inputs, tmp_path, capsys):
    """At 256 px a whole checkpoint is about 3 GB and the paper's run saves 40: all but the
    newest --keep-full keep only G_ema and the fusion layer's EMA, and generate the same
    images as whole ones."""
    whole, cut = cdtg_inputs / "whole", cdtg_inputs / "cut"
    train_main(tiny_train_args(cdtg_inputs, whole, "--iter", "6", "--clip", "none", "--keep-full", "0"))
    train_main(tiny_train_args(cdtg_inputs, cut, "--iter", "6", "--clip", "none", "--keep-full", "1"))
    states = {run: {step: load_cdtg_checkpoint(run / "checkpoint" / f"{step}.pt") for step in (2, 4, 6)}
              for run in (whole, cut)}
    assert all("d" in state and "g_optim" in state for state in states[whole].values())
    assert "d" in states[cut][6] and not states[cut][6].get("generation_only")
    for step in (2, 4):
        assert states[cut][step]["generation_only"] and not {"g", "d", "g_optim", "d_optim"} & states[cut][step].keys()
        assert (cut / "checkpoint" / f"{step}.pt").stat().st_size < (whole / "checkpoint" / f"{step}.pt").stat().st_size
    for run in (whole, cut):
        generation_main(["--ckpt", str(run / "checkpoint" / "4.pt"), "--out", str(tmp_path / f"gen-{run.name}"),
                         "--per-class", "2", "--device", "cpu", "--workers", "1"])
    images = {run: sorted((tmp_path / f"gen-{run}").rglob("*.jpg")) for run in ("whole", "cut")}
    assert len(images["cut"]) == 6
    assert [path.read_bytes() for path in images["cut"]] == [path.read_bytes() for path in images["whole"]]

    (cut / "checkpoint" / "6.pt").unlink()  # the newest gone: a cut one cannot continue the run
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, cut, "--iter", "8", "--clip", "none", "--resume"))
    assert "keeps only what generation reads (an older checkpoint, cut by --keep-full)" in capsys.readouterr().err


def test_checkpoints_of_earlier_versions_keep_their_fusion_layer_when_cut(cdtg_inputs, tmp_path, capsys,
                                                                         monkeypatch):
    """Runs of earlier versions saved the fusion layer without an average: a cut keeps it, as
    generation reads it; a checkpoint with no fusion weights at all is refused, not given the
    official stand-in. A file the cut cannot read is left whole, and training goes on; a
    run's later saves read neither again."""
    import CDTG.checkpoint as checkpoint_module

    torch_load = torch.load
    run = cdtg_inputs / "legacy-run"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "2", "--clip", "none", "--keep-full", "0"))
    legacy = load_cdtg_checkpoint(run / "checkpoint" / "2.pt")
    del legacy["fusion_ema"]
    torch.save(legacy, run / "checkpoint" / "2.pt")
    generate = ["--per-class", "2", "--device", "cpu", "--workers", "1"]
    generation_main(["--ckpt", str(run / "checkpoint" / "2.pt"), "--out", str(tmp_path / "whole"), *generate])
    torch.save({"args": argparse.Namespace(iter=1)}, run / "checkpoint" / "1.pt")  # not one the cut can read
    reads = []
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda path, *a, **k: reads.append(Path(path).name) or
                        torch_load(path, *a, **k))
    with pytest.warns(UserWarning, match="left .*1.pt whole") as warned:
        train_main(tiny_train_args(cdtg_inputs, run, "--iter", "6", "--clip", "none", "--keep-full", "1",
                                   "--resume"))
    assert sum("1.pt whole" in str(w.message) for w in warned) == 1  # at the first save, not at each
    assert reads.count("1.pt") == 1 and reads.count("4.pt") == 1  # older files read once in the run
    cut = load_cdtg_checkpoint(run / "checkpoint" / "2.pt")
    assert cut["generation_only"] and "fusion" not in cut and cut["fusion_ema"].keys() == legacy["fusion"].keys()
    generation_main(["--ckpt", str(run / "checkpoint" / "2.pt"), "--out", str(tmp_path / "cut"), *generate])
    assert [p.read_bytes() for p in sorted((tmp_path / "cut").rglob("*.jpg"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "whole").rglob("*.jpg"))]

    del cut["fusion_ema"]
    torch.save(cut, tmp_path / "no_fusion.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generation_main(["--ckpt", str(tmp_path / "no_fusion.pt"), "--out", str(tmp_path / "none"), *generate])
    assert "holds no noise-fusion weights" in capsys.readouterr().err


def test_generated_images_are_found_under_every_name_generation_writes(tmp_path):
    from CDTG.generated_folder import existing_indices, image_name

    indices = [0, 5, 999_999, 1_000_000, 1_234_567]
    for index in indices:
        (tmp_path / image_name(index)).write_bytes(b"")
    for foreign in ("gen_0000006.jpg", "gen_12345.jpg", "gen_000007.png", "x_000008.jpg"):  # never written by it
        (tmp_path / foreign).write_bytes(b"")
    assert existing_indices(tmp_path) == set(indices)


def weights_at_the_start(monkeypatch):
    """What CdtgTrainer.fit starts from; fit itself is skipped."""
    seen = {}

    def record(trainer, dataset, samples):
        seen.update(g=trainer.g.state_dict(), d=trainer.d.state_dict(), g_ema=trainer.g_ema.state_dict(),
                    fusion=trainer.fusion.state_dict(), fusion_ema=trainer.fusion_ema.state_dict(),
                    step=trainer.step, g_optim=trainer.g_optim.state_dict()["state"])
        return trainer.step

    monkeypatch.setattr(CdtgTrainer, "fit", record)
    return seen


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_init_starts_a_new_run_from_another_runs_weights(trained_ckpt, cdtg_inputs, monkeypatch):
    source = load_cdtg_checkpoint(trained_ckpt)
    seen = weights_at_the_start(monkeypatch)
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "tuned", "--iter", "4", "--clip", "none",
                               "--init", str(trained_ckpt)))
    for key in ("g", "d", "g_ema", "fusion", "fusion_ema"):
        assert same_weights(seen[key], source[key]), key
    assert seen["step"] == 0 and seen["g_optim"] == {}  # a new run: new optimizers
    assert not same_weights(source["fusion"], source["fusion_ema"])  # each from its own entry


def test_init_takes_weights_of_settings_that_build_the_same_models():
    """--channel-max 1024 builds what 512 builds (no layer is wider than 512): not refused;
    --lr-mlp keeps the shapes but not the function: refused."""
    from CDTG.training import FUNCTION_SETTINGS, check_same_models
    from tgn.checkpoint import check_fits

    built = {cap: (Generator(16, 8, 1, num_classes=2, channel_max=cap), Discriminator(16, 2, label_dim=8,
                                                                                      channel_max=cap))
             for cap in (512, 1024)}
    state = {"generator_config": built[1024][0].config, "discriminator_config": built[1024][1].config}
    check_same_models("x.pt", state, *built[512], FUNCTION_SETTINGS)
    check_fits(built[512][0], built[1024][0].state_dict(), "x.pt")
    faster = Generator(16, 8, 1, num_classes=2, channel_max=512, lr_mlp=0.1)
    with pytest.raises(UserError, match="its generator was built with lr_mlp 0.01, this run's with 0.1"):
        check_same_models("x.pt", state, faster, built[512][1], FUNCTION_SETTINGS)


def test_a_resumed_run_still_records_the_weights_it_started_from(trained_ckpt, cdtg_inputs, capsys):
    """options.json held the latest call's flags: after a --resume without --init it said the
    run started from nothing, and an --init a resume ignores was recorded as the start."""
    out = cdtg_inputs / "tuned"
    train_main(tiny_train_args(cdtg_inputs, out, "--iter", "2", "--clip", "none", "--init", str(trained_ckpt)))
    for extra in ([], ["--init", str(cdtg_inputs / "elsewhere.pt")]):
        capsys.readouterr()
        train_main(tiny_train_args(cdtg_inputs, out, "--iter", "3" if not extra else "4", "--clip", "none",
                                   "--resume", *extra))
        assert json.loads((out / "options.json").read_text())["init"] == str(trained_ckpt)
        newest = load_cdtg_checkpoint(out / "checkpoint" / ("3.pt" if not extra else "4.pt"))
        assert newest["options"]["init"] == str(trained_ckpt)
        noted = f"note: --init is not read: the run resumes from {out / 'checkpoint' / '3.pt'}"
        assert (noted in capsys.readouterr().out) == bool(extra)


@pytest.mark.skipif(not can_load_classes(), reason="the official options need torch 2.4 or later")
def test_init_takes_the_official_checkpoint_and_draws_its_missing_fusion_layer(cdtg_inputs, tmp_path, monkeypatch,
                                                                              capsys):
    torch.manual_seed(0)
    g = Generator(32, 16, 2, num_classes=3, channel_max=16)
    d = Discriminator(32, 3, label_dim=16, channel_max=16)
    torch.save({"g": g.state_dict(), "d": d.state_dict(), "g_ema": g.state_dict(), "g_optim": {}, "d_optim": {},
                "ada_aug_p": 0.0, "args": argparse.Namespace(size=32, channel_multiplier=2, iter=2, batch=4)},
               tmp_path / "200000.pt")
    seen = weights_at_the_start(monkeypatch)
    with pytest.warns(UserWarning, match="holds none \\(the official format\\): the noise-fusion layer starts afresh"):
        train_main(tiny_train_args(cdtg_inputs, tmp_path / "run", "--iter", "4", "--clip", "none", "--init",
                                   str(tmp_path / "200000.pt")))
    assert same_weights(seen["g"], g.state_dict()) and same_weights(seen["d"], d.state_dict())
    copied = tmp_path / "copied" / "checkpoint"  # the official file put where --resume looks
    copied.mkdir(parents=True)
    shutil.copy(tmp_path / "200000.pt", copied / "200000.pt")
    # With fewer steps too (not "it has already trained 200000 steps"); and never deleted by
    # --overwrite, also where --init names it: a downloaded file, 1.5 GB.
    for extra in (["--iter", "200001", "--resume"], ["--iter", "4", "--resume"], ["--iter", "4"],
                  ["--iter", "4", "--overwrite", "--init", str(copied / "200000.pt")]):
        with pytest.raises(SystemExit):
            train_main(tiny_train_args(cdtg_inputs, copied.parent, "--clip", "none", *extra))
        assert (f"error: {copied / '200000.pt'} is an official CDTG checkpoint, which cannot continue a run (and "
                "--overwrite would delete it): move it out of the run folder and start a run from its weights with "
                "--init 200000.pt") in capsys.readouterr().err
        assert (copied / "200000.pt").is_file()
    from CDTG.checkpoint import FORMAT

    torch.save({"format": FORMAT, "g_ema": g.state_dict()}, copied / "300000.pt")  # ours, newer: still not deleted
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, copied.parent, "--clip", "none", "--iter", "4", "--overwrite"))
    assert f"error: {copied / '200000.pt'} is an official CDTG checkpoint" in capsys.readouterr().err
    assert (copied / "200000.pt").is_file()


def test_an_official_checkpoint_is_told_from_ours_on_every_torch(trained_ckpt, tmp_path, monkeypatch):
    """torch before 2.4 cannot be allowed the official options (an argparse.Namespace): the
    file is official all the same, not 'a run that has trained 200000 steps'."""
    import contextlib

    import CDTG.checkpoint as checkpoint_module

    official = tmp_path / "200000.pt"
    torch.save({"g_ema": {"label_emb.weight": torch.zeros(3, 16)}, "args": argparse.Namespace(size=32, iter=200000)},
               official)
    for allowed in (True, False):
        if not allowed:
            monkeypatch.setattr(checkpoint_module, "loading_classes", lambda classes: contextlib.nullcontext())
        if allowed and not can_load_classes():
            continue
        assert checkpoint_module.is_official(official) and not checkpoint_module.is_official(trained_ckpt)


def test_init_refuses_what_it_cannot_start_from_before_writing(trained_ckpt, cdtg_inputs, tmp_path, capsys):
    from CDTG.checkpoint import cut_to_generation

    run = cdtg_inputs / "run"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "4", "--clip", "none", "--resume"))
    assert cut_to_generation(run / "checkpoint", keep=1) == [trained_ckpt]
    cases = [
        ([], trained_ckpt, "keeps only what generation reads, not G and D"),
        (["--size", "64"], run / "checkpoint" / "4.pt", "its generator was built with size 32, this run's with 64, "
                                                        "which the weights do not carry over to; pass --size 32"),
        # Shapes alike, another function: the mapping weights are stored divided by --lr-mlp.
        (["--lr-mlp", "0.1"], run / "checkpoint" / "4.pt", "its generator was built with lr_mlp 0.01, this run's "
                                                           "with 0.1, which the weights do not carry over to; pass "
                                                           "--lr-mlp 0.01"),
    ]
    for extra, path, message in cases:
        out = tmp_path / f"refused-{'-'.join(extra)}"
        with pytest.raises(SystemExit):
            train_main(tiny_train_args(cdtg_inputs, out, "--iter", "4", "--clip", "none", "--init", str(path),
                                       *extra))
        assert message in capsys.readouterr().err and not out.exists()
    other = load_cdtg_checkpoint(run / "checkpoint" / "4.pt")
    torch.save({**other, "class_ids": [4, 3, 2]}, tmp_path / "other_classes.pt")
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, tmp_path / "refused-classes", "--iter", "4", "--clip", "none",
                                   "--init", str(tmp_path / "other_classes.pt")))
    assert (f"--init {tmp_path / 'other_classes.pt'} was trained on classes [4, 3, 2], --data "
            f"{cdtg_inputs / 'cdtg_data'} has [2, 3, 4] (another split?)") in capsys.readouterr().err
    # Another dataset's generator, as many images under the same ids: its classes have other names.
    assert other["class_names"][-1] == "golf field"
    torch.save({**other, "class_names": [*other["class_names"][:-1], "bridge"]}, tmp_path / "other_names.pt")
    with pytest.raises(SystemExit):
        train_main(tiny_train_args(cdtg_inputs, tmp_path / "refused-names", "--iter", "4", "--clip", "none",
                                   "--init", str(tmp_path / "other_names.pt")))
    assert "was trained with class 4 named 'bridge', --data " in capsys.readouterr().err
    with pytest.raises(UserError, match="other_names.pt was trained with class 4 named 'bridge', the tail data "
                                        ".* names it 'golf field' \\(another dataset\\?\\)"):
        TailSynthesizer.from_checkpoint(tmp_path / "other_names.pt", torch.device("cpu"))


# --- the GAN losses and the trainer's wiring, against their formulas -------------------------

LABELS = torch.tensor([0, 1, 2, 0])


def real_batch():
    return colour_batch(LABELS, torch.Generator().manual_seed(0))


def test_gan_losses_match_their_formulas():
    """Catches G loss -> saturating -softplus(x); R1 mean over pixels instead of sum."""
    x = torch.tensor([-5.0, -2.0, 0.0, 3.0])
    torch.testing.assert_close(g_nonsaturating_loss(x), F.softplus(-x).mean())
    assert g_nonsaturating_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    torch.testing.assert_close(d_logistic_loss(x, -x), 2 * F.softplus(-x).mean())
    # A linear D, pred = <w, image>: its gradient is w, so R1 = |w|^2 for every sample.
    torch.manual_seed(0)
    w = torch.randn(3, 4, 5)
    images = torch.randn(2, 3, 4, 5, requires_grad=True)
    pred = (images * w).sum([1, 2, 3])
    assert d_r1_loss(pred, images).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_path_length_penalty_matches_its_formula():
    """On a linear G (fake = A latents) the gradient is A^T noise: lengths, running mean and
    penalty by hand. Catches sum over the latent layers, decay <-> 1 - decay,
    noise / sqrt(H) only, |.| instead of ^2, the mean not moved."""
    torch.manual_seed(0)
    batch, n_latent, dim, shape = 3, 4, 5, (2, 2, 4)  # H != W
    latents = torch.randn(batch, n_latent, dim, requires_grad=True)
    a = torch.randn(n_latent * dim, math.prod(shape), requires_grad=True)
    fake = (latents.flatten(1) @ a).view(batch, *shape)
    noise = torch.randn(batch, *shape)
    penalty, mean, lengths = g_path_regularize(fake, latents, torch.tensor(0.5), decay=0.1, noise=noise)
    grad = ((noise / math.sqrt(2 * 4)).flatten(1) @ a.t()).view(batch, n_latent, dim)
    expected_lengths = grad.pow(2).sum(2).mean(1).sqrt()
    expected_mean = 0.5 + 0.1 * (expected_lengths.mean() - 0.5)
    torch.testing.assert_close(lengths, expected_lengths)
    torch.testing.assert_close(mean, expected_mean)
    expected_penalty = (expected_lengths - expected_mean).pow(2).mean()
    torch.testing.assert_close(penalty, expected_penalty)
    # G's gradient flows through the moved mean too, as in StyleGAN2 (detaching it changes it).
    torch.testing.assert_close(torch.autograd.grad(penalty, a)[0], torch.autograd.grad(expected_penalty, a)[0])


def test_the_optimisers_use_the_lazy_regularisation_ratios(tmp_path):
    """StyleGAN2: lr * k/(k+1), betas (0, 0.99 ** (k/(k+1))), k = 4 for G, 16 for D.
    Catches G's beta2 not scaled, G with D's ratio."""
    trainer = make_trainer(tmp_path)
    (g,), (d,) = trainer.g_optim.param_groups, trainer.d_optim.param_groups
    assert g["lr"] == pytest.approx(0.002 * 4 / 5) and g["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))
    assert d["lr"] == pytest.approx(0.002 * 16 / 17) and d["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))


def test_the_r1_step_back_propagates_gamma_over_2_times_the_interval(tmp_path):
    """Step 0 regularises D: its second update's gradient is that of r1 / 2 * d_reg_every *
    R1, R1 computed here from D itself. Catches gamma instead of gamma / 2, R1 mean."""
    trainer = make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0, path_regularize=0.0)
    grads = []
    trainer.d_optim.step = lambda: grads.append({name: p.grad.clone() for name, p in trainer.d.named_parameters()
                                                 if p.grad is not None})  # D does not move
    real = real_batch()
    trainer.noise.reseed(0, 0)
    trainer.train_step(real, LABELS)
    assert len(grads) == 2  # the D step and the R1 step
    names, params = zip(*trainer.d.named_parameters())
    for p in params:
        p.requires_grad_(True)
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(trainer.d(x, LABELS).sum(), x, create_graph=True)
    r1 = grad.pow(2).flatten(1).sum(1).mean()
    expected = torch.autograd.grad(10.0 / 2 * 16 * r1, params, allow_unused=True)
    checked = 0
    for name, value in zip(names, expected):
        if value is not None and value.abs().sum() > 0:
            torch.testing.assert_close(grads[1][name], value, rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked > 5


def test_the_path_length_step_takes_half_the_batch_and_weight_times_interval(tmp_path, monkeypatch):
    """Catches the path batch not shrunk, the weight without * g_reg_every, the fakes drawn
    with other images' labels, the running mean not kept or moved at another rate than
    StyleGAN2's 0.01."""
    trainer = make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0)  # path 2, every 4, shrink 2
    params = list(trainer.g_optim.param_groups[0]["params"])
    seen = {}
    original = trainer_module.g_path_regularize

    def spy(fake, latents, mean, **kwargs):
        penalty, path_mean, lengths = original(fake, latents, mean, **kwargs)
        seen["batch"] = fake.shape[0]
        seen["expected"] = torch.autograd.grad(2.0 * 4 * penalty, params, retain_graph=True, allow_unused=True)
        seen["mean"], seen["lengths"] = path_mean, lengths.detach()
        return penalty, path_mean, lengths

    monkeypatch.setattr(trainer_module, "g_path_regularize", spy)
    generate = trainer.generate

    def generate_spy(module, batch, features, labels, **kwargs):
        if kwargs.get("return_latents"):  # the path-length pass
            seen["labels"] = labels.clone()
        return generate(module, batch, features, labels, **kwargs)

    monkeypatch.setattr(trainer, "generate", generate_spy)
    grads = []
    trainer.g_optim.step = lambda: grads.append([None if p.grad is None else p.grad.clone() for p in params])
    trainer.noise.reseed(0, 0)
    trainer.train_step(real_batch(), LABELS)
    assert seen["batch"] == 2 and len(grads) == 2
    assert torch.equal(seen["labels"], LABELS[:2])  # the first two images' features and labels
    assert float(seen["mean"]) == pytest.approx(0.01 * float(seen["lengths"].mean()))  # from 0 at the first step
    assert float(trainer.mean_path_length) == pytest.approx(float(seen["mean"]))
    checked = 0
    for got, expected in zip(grads[1], seen["expected"]):
        if expected is not None and expected.abs().sum() > 0:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
            checked += 1
    assert checked > 5


def test_ada_augments_reals_and_fakes_and_tunes_on_the_real_predictions(tmp_path):
    """Every D input is augmented (D step fakes and reals, the R1 reals, the G step's fakes),
    and ADA's p follows D's outputs on the reals. Catches reals not augmented, G's fakes
    not augmented, p tuned on the fakes' predictions."""
    trainer = make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0, path_regularize=0.0, augment=True)
    assert trainer.ada is not None
    augmented, outputs, tuned = [], [], []
    maybe_augment, d_main, tune = trainer.maybe_augment, trainer.d_main, trainer.ada.tune
    trainer.maybe_augment = lambda images: augmented.append(images.detach().clone()) or maybe_augment(images)
    trainer.d_main = lambda images, labels: outputs.append(d_main(images, labels)) or outputs[-1]
    trainer.ada.tune = lambda pred: tuned.append(pred.detach().clone()) or tune(pred)
    real = real_batch()
    trainer.noise.reseed(0, 0)
    trainer.train_step(real, LABELS)
    assert len(augmented) == 4  # D fakes, D reals, R1 reals, G fakes
    assert torch.equal(augmented[1], real) and torch.equal(augmented[2], real)
    assert len(tuned) == 1 and torch.equal(tuned[0], outputs[1].detach().float())


def test_training_fuses_with_the_fusion_noise_ratio(tmp_path, monkeypatch):
    """Catches the step's generate() passing 1 - fusion_noise."""
    trainer = make_trainer(tmp_path, lambda_clip=0.0, fusion_noise=0.7)
    ratios = []
    forward = NoiseFusion.forward
    monkeypatch.setattr(NoiseFusion, "forward", lambda self, noise, feature, ratio: ratios.append(ratio) or forward(
        self, noise, feature, ratio))
    trainer.noise.reseed(0, 0)
    trainer.train_step(real_batch(), LABELS)
    assert len(ratios) >= 3 and all(r == 0.7 for r in ratios)


def test_fit_reseeds_every_step_from_the_seed_and_the_step(cdtg_inputs, monkeypatch):
    """Catches every step reseeded as step 0: the same latents, noise and flips at every step,
    invisible to the resume tests, which compare two runs of the same code."""
    seen = []
    reseed = StepNoise.reseed
    monkeypatch.setattr(StepNoise, "reseed", lambda self, seed, step: seen.append((seed, step)) or reseed(
        self, seed, step))
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "3", "--clip", "none", "--seed", "7"))
    assert seen == [(7, 0), (7, 1), (7, 2)]


def test_the_fusion_bias_has_the_learning_rate_multiplier():
    """Catches the bias used without * lr_mul: it would learn 100x faster than the weights."""
    fusion = NoiseFusion(8, 4, lr_mul=0.01)
    with torch.no_grad():
        fusion.project.weight.zero_()
        fusion.project.bias.fill_(1.0)
    torch.testing.assert_close(fusion.embed(torch.rand(2, 8)), torch.full((2, 4), 0.01))


def test_generated_pixels_are_rounded_not_truncated():
    """Catches the 8-bit conversion flooring: every image half a level darker on average,
    within the <= 1 tolerance of the rendering test."""
    synth = TailSynthesizer.__new__(TailSynthesizer)
    images = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    synth.g_ema, synth.amp, synth.device = (lambda *args, **kwargs: (images, None)), "off", torch.device("cpu")
    out = synth.synthesize(None, None, None, 1.0, None)
    assert out[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_generating_one_class_keeps_the_other_classes_in_the_annotation(trained_ckpt, tmp_path):
    """Adding the images of one class (--classes) to a generated folder keeps the images of
    the classes generated before listed in anno.txt, which Classification/train.py --extra
    trains on: it lists every image on disk."""
    from CDTG.generation import main as generation_main

    out = tmp_path / "gen"
    argv = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--per-class", "1", "--out", str(out)]
    generation_main([*argv, "--classes", "3"])
    generation_main([*argv, "--classes", "4"])
    assert sorted(label for _, label in read_anno(out)) == ["3", "4"]


def test_the_newest_checkpoint_is_the_highest_step_past_a_power_of_ten(tmp_path):
    """--resume continues from, and --keep-full keeps whole, the checkpoint of the highest
    step also when the step numbers have different digit counts (9.pt, 10.pt, 100.pt): a
    text sort would take 9.pt for the newest and cut 100.pt."""
    from CDTG.checkpoint import checkpoint_steps

    for step in (100, 9, 10, 1000):
        (tmp_path / f"{step}.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_bytes(b"")  # not a numbered checkpoint
    assert checkpoint_steps(tmp_path) == [9, 10, 100, 1000]


def test_zero_padded_checkpoint_names_are_found_by_their_step(cdtg_inputs, monkeypatch):
    """Runs of the official code name checkpoints zero-padded (`000004.pt`): --resume reads
    the newest of them, --keep-full cuts the older ones, and a run folder given as a
    checkpoint names the file to pass. Where both names of a step are there, ours is read."""
    from CDTG.checkpoint import numbered_checkpoints

    run = cdtg_inputs / "padded"
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "4", "--clip", "none", "--keep-full", "0"))
    for step in (2, 4):
        (run / "checkpoint" / f"{step}.pt").rename(run / "checkpoint" / f"{step:06d}.pt")
    with pytest.raises(UserError, match=re.escape(f"pass {run / 'checkpoint' / '000004.pt'}, its newest")):
        load_cdtg_checkpoint(run)
    train_main(tiny_train_args(cdtg_inputs, run, "--iter", "6", "--clip", "none", "--keep-full", "1", "--resume"))
    assert load_cdtg_checkpoint(run / "checkpoint" / "6.pt")["step"] == 6
    assert all(load_cdtg_checkpoint(run / "checkpoint" / name).get("generation_only")
               for name in ("000002.pt", "000004.pt"))
    (run / "checkpoint" / "000006.pt").write_bytes(b"")  # a padded copy beside ours
    glob = Path.glob
    for descending in (False, True):  # whichever of the two the file system lists first
        with monkeypatch.context() as patched:
            patched.setattr(Path, "glob", lambda folder, pattern: sorted(glob(folder, pattern), reverse=descending))
            assert numbered_checkpoints(run / "checkpoint")[6] == run / "checkpoint" / "6.pt"


def test_every_pass_of_a_step_gets_the_batch_s_own_labels(tmp_path):
    """G's mapping network, D (fakes and reals) and the CLIP loss each see the label of the
    image in hand. Catches class conditioning dropped from G, labels shifted for D's fakes or
    G's adversarial pass, CLIP scoring fakes against other classes' prompts."""
    trainer = make_trainer(tmp_path, path_batch_shrink=1)
    seen = {"d": [], "g": [], "clip": []}
    d_main, get_latent, clip_forward = trainer.d_main, trainer.g.get_latent, trainer.clip_loss.forward
    trainer.d_main = lambda images, labels: seen["d"].append(labels.clone()) or d_main(images, labels)
    trainer.g.get_latent = lambda z, labels=None: seen["g"].append(labels) or get_latent(z, labels)

    def clip_scoring(images, labels):
        seen["clip"].append(labels.clone())
        return clip_forward(images, labels)

    trainer.clip_loss.forward = clip_scoring
    trainer.noise.reseed(0, 0)
    trainer.train_step(real_batch(), LABELS)
    assert len(seen["d"]) >= 3 and all(torch.equal(labels, LABELS) for labels in seen["d"])
    assert seen["g"] and all(labels is not None and torch.equal(labels, LABELS[:len(labels)]) for labels in seen["g"])
    assert seen["clip"] and all(torch.equal(labels, LABELS) for labels in seen["clip"])


def test_the_path_length_pass_fuses_the_features_of_its_own_images(tmp_path):
    """At the default shrink of 2 the path pass takes the first half of the batch: its
    features and its labels (the first rows of both), not the last features."""
    trainer = make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0)
    fused, generate = [], trainer.generate

    def recording(module, batch, features, labels, **options):
        if options.get("return_latents"):
            fused.append((features.clone(), labels.clone()))
        return generate(module, batch, features, labels, **options)

    trainer.generate = recording
    real = real_batch()
    trainer.noise.reseed(0, 0)
    trainer.train_step(real, LABELS)
    with torch.no_grad():
        _, features = trainer.teacher(real)
    [(path_features, path_labels)] = fused
    assert torch.equal(path_features, features[:2]) and torch.equal(path_labels, LABELS[:2])


def test_the_teacher_loss_is_its_cross_entropy():
    """Catches the sign flipped: a loss that falls below 0 still 'decreases' in training."""
    torch.manual_seed(0)
    teacher = FeatureResNet("resnet18", num_classes=3, width=4).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(teacher_classification_loss(teacher, images, labels),
                               F.cross_entropy(teacher(images)[0], labels))


def test_the_fusion_layer_starts_at_unit_scale_and_its_fallback_leaves_the_global_generator():
    """Equalised learning rate: weights drawn N(0, 1/lr_mul) times lr_mul/sqrt(fan-in) give
    outputs of unit scale (without lr_mul the feature term is 100x the noise's). The fixed
    fallback projection leaves torch's global random state as it found it."""
    torch.manual_seed(0)
    embedded = NoiseFusion(1024, 64, lr_mul=0.01).embed(torch.randn(512, 1024, 1, 1))
    assert 0.9 < embedded.std().item() < 1.1
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="no noise-fusion weights"):
        NoiseFusion.official_fallback(16, 4)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_style_mixing_crosses_over_after_1_to_n_minus_1_layers_and_flips_half():
    """As the official mixing_noise: the crossover is one of 1 .. n_latent - 1; --flip
    mirrors each real image with probability 1/2."""
    noise = StepNoise(torch.device("cpu"), 4, 1.0, [(1, 1, 4, 4)], 6)
    random.seed(0)
    assert {noise.latents(1)[1] for _ in range(500)} == set(range(1, 6))
    noise.generator.manual_seed(0)
    assert abs(noise.flips(20000).float().mean().item() - 0.5) < 0.02


def test_sample_grids_fuse_with_the_averaged_fusion_layer(tmp_path):
    """g_ema draws the grids, from latents of the averaged fusion layer (fusion_ema), which
    generation uses; the trained fusion layer differs from it."""
    trainer = make_trainer(tmp_path, lambda_clip=0.0)
    with torch.no_grad():
        trainer.fusion_ema.project.weight.mul_(3)
    latents, get_latent = [], trainer.g_ema.get_latent
    trainer.g_ema.get_latent = lambda z, labels=None: latents.append(z.clone()) or get_latent(z, labels)
    z, real = torch.randn(4, 16), real_batch()
    trainer.write_samples(z, LABELS, real)
    trainer.finish_samples(close=True)
    with torch.no_grad():
        expected = trainer.fusion_ema(z, trainer.teacher(real)[1], 0.8)
    torch.testing.assert_close(latents[0], expected)


def test_real_tail_images_are_scaled_to_minus_one_to_one(cdtg_inputs):
    """The scale of G's tanh-free output in StyleGAN2 and of what D and M_T see: a bright
    image's pixels near 1 and a dark one's near -1, not 0..1."""
    from CDTG.tail_data import tail_image_dataset

    dataset = tail_image_dataset(load_tail_classes(cdtg_inputs / "cdtg_data"), 32)
    pixels = torch.stack([dataset[index][0] for index in range(len(dataset))])
    assert pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0


def test_each_row_of_the_sample_grid_fuses_a_real_image_of_its_class(cdtg_inputs):
    from CDTG.tail_data import tail_image_dataset
    from CDTG.training import sample_set

    dataset = tail_image_dataset(load_tail_classes(cdtg_inputs / "cdtg_data"), 32)
    _, labels, real = sample_set(dataset, 3, 16, torch.device("cpu"))
    targets = dataset.targets()
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    for image, label in zip(real, labels.tolist()):
        assert torch.equal(image, dataset[targets.index(label)][0])


def test_adaptive_augmentation_resumes_its_probability_and_window(tmp_path):
    trainer = make_trainer(tmp_path, lambda_clip=0.0, augment=True)
    trainer.ada.p, trainer.ada.count, trainer.ada_p, trainer.step = 0.3, 12, 0.3, 5
    trainer.ada.sign_sum.fill_(7.0)
    trainer.metadata["fusion_config"] = trainer.fusion.config  # as train.py records it
    trainer.save()
    resumed = make_trainer(tmp_path, lambda_clip=0.0, augment=True)
    resumed.metadata["fusion_config"] = resumed.fusion.config
    assert resumed.resume()
    assert resumed.ada_p == 0.3 and resumed.ada.state_dict() == trainer.ada.state_dict()


def test_a_generator_gone_non_finite_is_never_saved(tmp_path):
    trainer = make_trainer(tmp_path, lambda_clip=0.0)
    with torch.no_grad():
        next(trainer.g.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="the generator's weights became non-finite by step 0; nothing saved"):
        trainer.save()
    assert not list(tmp_path.rglob("*.pt"))


# --- the wiring: flags reach the code, orders match, intervals, starting copies ---------------------

def trainer_as_train_py_builds_it(cdtg_inputs, monkeypatch, *extra):
    """CDTG/train.py up to the training loop: the CdtgTrainer it built (fit does nothing)."""
    import CDTG.training as training

    built = {}

    def no_fit(trainer, dataset, samples):
        built["trainer"] = trainer
        return 0

    monkeypatch.setattr(training.CdtgTrainer, "fit", no_fit)
    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1", *extra))
    return built["trainer"]


def test_r1_and_the_path_length_run_at_their_own_intervals(tmp_path, monkeypatch):
    """R1 every d_reg_every steps, the path length every g_reg_every: step 0, which every
    interval regularises, cannot tell them apart."""
    trainer = make_trainer(tmp_path, lambda_cls=0.0, lambda_clip=0.0, d_reg_every=3, g_reg_every=2)
    calls = {"r1": [], "path": []}
    r1, path = trainer_module.d_r1_loss, trainer_module.g_path_regularize
    monkeypatch.setattr(trainer_module, "d_r1_loss", lambda *a, **k: calls["r1"].append(trainer.step) or r1(*a, **k))
    monkeypatch.setattr(trainer_module, "g_path_regularize",
                        lambda *a, **k: calls["path"].append(trainer.step) or path(*a, **k))
    real = real_batch()
    for step in range(7):
        trainer.noise.reseed(0, step)
        trainer.train_step(real, LABELS)
        trainer.step += 1
    assert calls == {"r1": [0, 3, 6], "path": [0, 2, 4, 6]}


def test_style_mixing_happens_with_the_mixing_probability():
    """A step mixes two latents with probability `mixing` (0.9), not 1 - mixing."""
    noise = StepNoise(torch.device("cpu"), 4, 0.9, [(1, 1, 4, 4)], 6)
    state = random.getstate()
    random.seed(0)
    mixed = [len(noise.latents(1)[0]) == 2 for _ in range(2000)]
    random.setstate(state)  # the draws StepNoise makes come from Python's shared generator
    assert 0.87 < sum(mixed) / len(mixed) < 0.93
    noise.mixing = 0.0
    assert not any(len(noise.latents(1)[0]) == 2 for _ in range(100))


def test_g_ema_starts_as_a_copy_of_g(cdtg_inputs, monkeypatch):
    """train.py starts g_ema as a copy of G, not as another random draw (make_trainer copies
    it itself)."""
    trainer = trainer_as_train_py_builds_it(cdtg_inputs, monkeypatch, "--clip", "none")
    ema = dict(trainer.g_ema.named_parameters())
    for name, parameter in trainer.g.named_parameters():
        assert torch.equal(ema[name], parameter), name


def test_the_clip_text_rows_follow_the_generator_labels(cdtg_inputs, monkeypatch):
    """Row k of CLIP's text features is label k's prompt: the toy prompts (airport, dam, golf
    field) are in alphabetical order already, so prompts sorted on the way would pass."""
    from CDTG.clip_loss import tokenize_prompts

    manifest = cdtg_inputs / "cdtg_data" / "tail_classes.json"
    data = json.loads(manifest.read_text())
    written = {2: "A photo of a zebra crossing", 3: "A photo of a dam", 4: "A photo of an apple orchard"}
    for cls in data["classes"]:
        cls["prompt"] = written[cls["id"]]
    manifest.write_text(json.dumps(data))
    loss = trainer_as_train_py_builds_it(cdtg_inputs, monkeypatch).clip_loss
    in_label_order = [cls["prompt"] for cls in sorted(data["classes"], key=lambda c: c["label"])]
    assert in_label_order != sorted(in_label_order)
    with torch.no_grad():
        expected = F.normalize(loss.clip.encode_text(tokenize_prompts(in_label_order)).float(), dim=-1)
    torch.testing.assert_close(loss.text_features, expected)


def test_truncated_images_use_their_own_class_centre(cdtg_inputs):
    """With truncation 0 an image is its own class's centre rendered (not another label's);
    with 0.5 its latent is halfway between its own and the centre (not 0.5 ** 2 of the way)."""

    tail = load_tail_classes(cdtg_inputs / "cdtg_data")
    torch.manual_seed(0)
    generator = Generator(32, 16, 2, num_classes=3, channel_max=16)
    teacher = load_teacher(cdtg_inputs / "M_T.pth", tail)
    channels, height, width = teacher.feature_shape(32)
    synth = TailSynthesizer(generator, NoiseFusion(channels * height * width, 16, lr_mul=0.01), teacher, tail,
                            torch.device("cpu"))
    for class_id in (3, 4):  # labels 1 and 2
        label = tail.label_of()[class_id]
        inputs = synth.batch_inputs(class_id, [0], seed=0)
        got = synth.render(class_id, inputs, ratio=0.05, truncation=0.0, batch_size=1)
        centre = synth.mean_latent(label, 0.05)
        expected = synth.synthesize(centre, torch.tensor([label]), synth.noise_maps(inputs[2]), 1.0, None)
        assert torch.equal(got, expected.permute(0, 2, 3, 1)), class_id
    z, real, noise = inputs
    with torch.no_grad():
        styles = synth.g_ema.get_latent(0.05 * z + 0.95 * synth.projected_features(label)[real], torch.tensor([label]))
        halfway = synth.synthesize(centre + 0.5 * (styles - centre), torch.tensor([label]), synth.noise_maps(noise),
                                   1.0, None)
    got = synth.render(class_id, inputs, ratio=0.05, truncation=0.5, batch_size=1)
    assert (got.int() - halfway.permute(0, 2, 3, 1).int()).abs().max() <= 1
    assert not torch.equal(got, synth.render(class_id, inputs, ratio=0.05, truncation=1.0, batch_size=1))


def test_generation_flags_r_and_truncation_reach_the_renderer(cdtg_inputs, tmp_path, monkeypatch):
    """generation.py's --r and --truncation reach the renderer as given (the other tests
    give the ratio by hand, or read the flags only as generation.json records them)."""

    train_main(tiny_train_args(cdtg_inputs, cdtg_inputs / "run", "--iter", "1", "--clip", "none"))
    seen = []
    render = TailSynthesizer.render

    def spy(self, class_id, inputs, *, ratio, truncation=1.0, batch_size=64):
        seen.append((ratio, truncation))
        return render(self, class_id, inputs, ratio=ratio, truncation=truncation, batch_size=batch_size)

    monkeypatch.setattr(TailSynthesizer, "render", spy)
    generation_main(["--ckpt", str(cdtg_inputs / "run" / "checkpoint" / "1.pt"), "--out", str(tmp_path / "gen"),
                     "--per-class", "1", "--batch", "1", "--r", "0.3", "--truncation", "0.7", "--device", "cpu",
                     "--workers", "1"])
    assert len(seen) == 3 and set(seen) == {(0.3, 0.7)}
