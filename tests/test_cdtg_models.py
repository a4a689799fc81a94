"""CDTG SWAGAN models: official checkpoint format, conditioning, mixing, noise, fused paths."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from CDTG.swagan import Discriminator, Generator, ModulatedConv2d

FORMATS_NAME = "reference/official_state_dict_formats.json"
FORMATS_PLACES = [Path(__file__).resolve().parent / "official_state_dict_formats.json",
                  Path(__file__).resolve().parents[1] / "shared" / FORMATS_NAME]
OFFICIAL_G = "CDTG.Generator(size=256,style_dim=512,num_classes=12,n_mlp=8,channel_multiplier=2)"
OFFICIAL_D = "CDTG.Discriminator(size=256,num_classes=12,label_dim=512,channel_multiplier=2)"
# sha256 of the "name:shape" lines of each official format, so the check also runs where
# the JSON is not available (CI).
OFFICIAL_FINGERPRINTS = {
    OFFICIAL_G: "db41cd447a63e9ac1deb02c5f9c6f21b907439cf6a38d6140f0d97a09512e1d2",
    OFFICIAL_D: "5453ce383a787700fe2b64bea9b7c02b41acb4f0a30bc2ad68c80f6c11fe4e9c",
}
SMALL_G = dict(style_dim=16, n_mlp=2, num_classes=3, channel_max=16)
SMALL_D = dict(num_classes=3, label_dim=8, channel_max=16)


def fingerprint(shapes):
    text = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()


def official_formats():
    for place in FORMATS_PLACES:
        if place.exists():
            formats = json.loads(place.read_text())
            return {name: formats[name] for name in OFFICIAL_FINGERPRINTS}
    return None


def official_models_on_meta():
    # The 256 px models hold ~60M parameters; on the meta device nothing is allocated.
    with torch.device("meta"):
        return {OFFICIAL_G: Generator(256, num_classes=12), OFFICIAL_D: Discriminator(256, 12)}


@pytest.fixture
def small_generator():
    torch.manual_seed(0)
    generator = Generator(32, **SMALL_G)
    for name, parameter in generator.named_parameters():
        if name.endswith("noise.weight"):  # zero at init: make the noise visible
            parameter.data.fill_(0.5)
    return generator


def test_state_dicts_match_official_format_key_for_key():
    formats = official_formats()
    for name, model in official_models_on_meta().items():
        shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
        if formats is not None:
            assert list(shapes) == list(formats[name])
            assert shapes == formats[name]
        assert fingerprint(shapes) == OFFICIAL_FINGERPRINTS[name]


def test_official_format_loads_with_strict():
    formats = official_formats()
    if formats is None:
        pytest.skip("official_state_dict_formats.json not available")
    for name, model in official_models_on_meta().items():
        state = {key: torch.empty(shape, device="meta") for key, shape in formats[name].items()}
        model.load_state_dict(state, strict=True, assign=True)
        with pytest.raises(RuntimeError):
            model.load_state_dict({**state, "unexpected.weight": torch.empty(1, device="meta")})


def test_the_official_checkpoints_settings_are_read_off_its_full_size_weights():
    """200000.pt at its own size (on the meta device): the settings read off its weights
    and options rebuild models that load its G_ema and D strictly."""
    import argparse

    from CDTG.checkpoint import from_official

    formats = official_formats()
    if formats is None:
        pytest.skip("official_state_dict_formats.json not available")
    weights = {name: {key: torch.empty(shape, device="meta") for key, shape in formats[name].items()}
               for name in (OFFICIAL_G, OFFICIAL_D)}
    official = {"g": weights[OFFICIAL_G], "g_ema": weights[OFFICIAL_G], "d": weights[OFFICIAL_D],
                "args": argparse.Namespace(size=256, iter=200000, channel_multiplier=2, batch=8), "ada_aug_p": 0.1}
    read = from_official(official)
    assert read["generator_config"] == {"size": 256, "style_dim": 512, "n_mlp": 8, "num_classes": 12,
                                        "channel_multiplier": 2}
    assert read["discriminator_config"] == {"size": 256, "num_classes": 12, "channel_multiplier": 2,
                                            "label_dim": 512}
    assert read["step"] == 200000 and read["fusion"] is None and read["options"]["batch"] == 8
    with torch.device("meta"):
        generator = Generator(**read["generator_config"])
        discriminator = Discriminator(**read["discriminator_config"])
    generator.load_state_dict(read["g_ema"], strict=True, assign=True)
    discriminator.load_state_dict(read["d"], strict=True, assign=True)


def test_the_official_channel_multiplier_and_plain_options_are_read(tmp_path):
    """A run of the official code with --channel_multiplier 1 rebuilds at that width; its
    options keep plain values only (ours are JSON)."""
    import argparse

    from CDTG.checkpoint import from_official

    g = Generator(32, 64, 2, num_classes=3, channel_multiplier=1)
    read = from_official({"g_ema": g.state_dict(), "args": argparse.Namespace(
        size=32, channel_multiplier=1, path=Path("data"), sizes=[1, 2], batch=8)})
    assert read["generator_config"]["channel_multiplier"] == read["discriminator_config"]["channel_multiplier"] == 1
    assert read["options"] == {"size": 32, "channel_multiplier": 1, "batch": 8}


def test_only_a_class_conditional_generator_is_taken_for_an_official_checkpoint(tmp_path):
    from CDTG.checkpoint import is_official, load_cdtg_checkpoint
    from tgn.errors import UserError

    torch.save({"g_ema": {"style.1.weight": torch.zeros(1)}}, tmp_path / "unconditional.pt")
    assert not is_official(tmp_path / "unconditional.pt")
    with pytest.raises(UserError, match="no class embedding"):
        load_cdtg_checkpoint(tmp_path / "unconditional.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")  # a ResNet given by mistake
    assert not is_official(tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"is not a CDTG checkpoint \(no g_ema\)"):
        load_cdtg_checkpoint(tmp_path / "resnet.pth")


def test_config_rebuilds_model_that_loads_and_matches(small_generator):
    rebuilt = Generator(**small_generator.config)
    rebuilt.load_state_dict(small_generator.state_dict(), strict=True)
    z, labels = torch.randn(2, 16), torch.tensor([0, 2])
    expected, _ = small_generator([z], labels, randomize_noise=False)
    image, _ = rebuilt([z], labels, randomize_noise=False)
    torch.testing.assert_close(image, expected)

    discriminator = Discriminator(32, **SMALL_D)
    Discriminator(**discriminator.config).load_state_dict(discriminator.state_dict(), strict=True)


def test_generator_forward_backward_shapes(small_generator):
    z, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 1])
    image, latent = small_generator([z, torch.randn(4, 16)], labels, return_latents=True)
    assert image.shape == (4, 3, 32, 32)
    assert latent.shape == (4, small_generator.n_latent, 16)
    assert small_generator([z], labels)[1] is None
    image.square().mean().backward()
    for name, parameter in small_generator.named_parameters():
        assert parameter.grad is not None, name


def test_discriminator_forward_backward_and_r1():
    torch.manual_seed(0)
    discriminator = Discriminator(32, **SMALL_D)
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    scores = discriminator(images, torch.tensor([0, 1, 2, 0]))
    assert scores.shape == (4, 1)
    # R1 needs the gradient of the scores wrt the images to be differentiable again; the
    # final bias has no R1 gradient, the score term reaches it.
    (grad,) = torch.autograd.grad(scores.sum(), images, create_graph=True)
    (grad.square().sum() + scores.mean()).backward()
    for name, parameter in discriminator.named_parameters():
        assert parameter.grad is not None, name


def test_minibatch_stddev_groups_samples_n_apart():
    discriminator = Discriminator(16, **SMALL_D)
    features = torch.randn(8, 5, 4, 4)
    out = discriminator.minibatch_stddev(features)
    groups = features.view(4, 2, 5, 4, 4)  # group members are samples m, m + 2, m + 4, m + 6
    expected = (groups.var(0, unbiased=False) + 1e-8).sqrt().mean([1, 2, 3])
    torch.testing.assert_close(out[:, 5, 0, 0], expected.repeat(4))
    with pytest.raises(ValueError):
        discriminator.minibatch_stddev(torch.randn(6, 5, 4, 4))


def test_style_mixing_changes_only_the_later_layers(small_generator):
    z1, z2, labels = torch.randn(2, 16), torch.randn(2, 16), torch.tensor([0, 1])
    plain, plain_latent = small_generator([z1], labels, randomize_noise=False, return_latents=True)
    mixed, mixed_latent = small_generator([z1, z2], labels, inject_index=3,
                                          randomize_noise=False, return_latents=True)
    assert not torch.allclose(plain, mixed)
    torch.testing.assert_close(mixed_latent[:, :3], plain_latent[:, :3])
    torch.testing.assert_close(mixed_latent[:, 3:], small_generator.get_latent(z2, labels)[:, None].expand(-1, 3, -1))


def test_labels_change_the_outputs(small_generator):
    z = torch.randn(2, 16)
    first, _ = small_generator([z], torch.tensor([0, 0]), randomize_noise=False)
    second, _ = small_generator([z], torch.tensor([1, 2]), randomize_noise=False)
    assert not torch.allclose(first, second)

    discriminator = Discriminator(32, **SMALL_D)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(discriminator(images, torch.tensor([0, 0])),
                              discriminator(images, torch.tensor([1, 2])))


def test_fixed_noise_is_deterministic_and_random_noise_is_not(small_generator):
    z, labels = torch.randn(2, 16), torch.tensor([0, 1])
    first, _ = small_generator([z], labels, randomize_noise=False)
    second, _ = small_generator([z], labels, randomize_noise=False)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    buffers = [getattr(small_generator.noises, f"noise_{i}") for i in range(small_generator.num_layers)]
    explicit, _ = small_generator([z], labels, noise=buffers)
    torch.testing.assert_close(explicit, first, rtol=0, atol=0)
    random_noise, _ = small_generator([z], labels)
    assert not torch.allclose(random_noise, first)
    assert [tuple(n.shape) for n in small_generator.make_noise()] == [tuple(b.shape) for b in buffers]


def test_latent_input_and_truncation(small_generator):
    z, labels = torch.randn(2, 16), torch.tensor([0, 1])
    image, latent = small_generator([z], labels, randomize_noise=False, return_latents=True)
    from_latent, _ = small_generator([latent], labels, input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(from_latent, image)
    # Truncation 0 collapses every z onto the (class-conditional) mean latent.
    mean = small_generator.mean_latent(64, labels=1)
    collapsed, _ = small_generator([torch.randn(2, 16)], torch.tensor([1, 1]), truncation=0,
                                   truncation_latent=mean, randomize_noise=False)
    torch.testing.assert_close(collapsed[0], collapsed[1])


def test_labels_longer_than_the_batch_are_cut(small_generator):
    z = torch.randn(2, 16)
    short, _ = small_generator([z], torch.tensor([2, 1]), randomize_noise=False)
    cut, _ = small_generator([z], torch.tensor([2, 1, 0, 0]), randomize_noise=False)
    torch.testing.assert_close(cut, short)


@pytest.mark.parametrize("upsample, demodulate, kernel_size",
                         [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_fused_and_shared_weight_modulated_conv_agree(upsample, demodulate, kernel_size):
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, kernel_size, style_dim=7, demodulate=demodulate, upsample=upsample)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 7)
    fused = conv(x, style)
    conv.fused = False
    torch.testing.assert_close(conv(x, style), fused, rtol=1e-5, atol=1e-5)


def test_generator_fused_and_shared_weight_paths_agree(small_generator):
    z, labels = torch.randn(2, 16), torch.tensor([0, 1])
    fused, _ = small_generator([z], labels, randomize_noise=False)
    small_generator.set_fused_modconv(False)
    assert not any(m.fused for m in small_generator.modules() if isinstance(m, ModulatedConv2d))
    shared, _ = small_generator([z], labels, randomize_noise=False)
    torch.testing.assert_close(shared, fused, rtol=1e-4, atol=1e-5)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        Generator(48, **SMALL_G)
    with pytest.raises(ValueError):
        Discriminator(8, **SMALL_D)


@pytest.mark.parametrize("upsample", [False, True])
def test_styled_conv_applies_gain_noise_and_bias_in_one_pass_as_in_separate_steps(upsample):
    """StyledConv's shared-weight path folds demodulation, noise, bias and the activation's
    gain together; it must compute conv -> noise -> FusedLeakyReLU, the official order,
    down to the second derivatives that path-length regularisation takes."""
    from CDTG.layers import StyledConv

    torch.manual_seed(0)
    layer = StyledConv(6, 5, 3, style_dim=7, upsample=upsample)
    with torch.no_grad():  # trained values: the zero initial noise weight and bias would hide a slip
        layer.noise.weight.fill_(0.7)
        layer.activate.bias.normal_()
    layer.conv.fused = False
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 7, requires_grad=True)
    noise = torch.randn(3, 1, 16 if upsample else 8, 16 if upsample else 8)

    def folded(x, style):
        return layer(x, style, noise=noise)

    def in_steps(x, style):
        return layer.activate(layer.noise(layer.conv(x, style), noise=noise))

    def parameter_gradients(fn):
        """Of a loss plus its gradient's norm (as in the path-length penalty), so that first
        and second derivatives both count."""
        layer.zero_grad()
        loss = (fn(x, style) * weights).sum()
        (grad,) = torch.autograd.grad(loss, style, create_graph=True)
        (loss + grad.square().sum()).backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    reference = in_steps(x, style)
    assert (reference < 0).any() and (reference > 0).any()  # both slopes of the leaky ReLU are used
    torch.testing.assert_close(folded(x, style), reference, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(reference)
    expected = parameter_gradients(in_steps)
    for name, grad in parameter_gradients(folded).items():
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_modulated_conv_matches_the_stylegan2_formula():
    """Both paths against the formula written out, eps 1e-8. Catches eps 1e-2, which the
    fused-vs-shared comparison cannot see (both paths share it)."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 3, 3, style_dim=5)
    x, style = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    with torch.no_grad():
        s = conv.modulation(style)
        w = conv.scale * conv.weight * s.view(2, 1, 4, 1, 1)
        w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4], keepdim=True) + 1e-8)
        expected = torch.cat([F.conv2d(x[i:i + 1], w[i], padding=1) for i in range(2)])
        for fused in (True, False):
            conv.fused = fused
            torch.testing.assert_close(conv(x, style), expected, rtol=1e-5, atol=1e-6)
