"""CDTG's SWAGAN against naive references written from the StyleGAN2 / SWAGAN definitions.

Every reference here is built from elementary tensor indexing: upfirdn2d as the matrix of
the linear operator (which input sample each tap of each output reads), the Haar bands as
sums and differences of 2x2 pixel blocks, convolutions as sums of shifted slices. None of
them calls the project's ops or torch's (transposed) convolutions, so the whole generator
and discriminator, read off the project's own parameters by their official names, are
checked layer for layer against the definitions.

Overlap with tests/test_cdtg_ops.py and tests/test_cdtg_models.py: those compare
upfirdn2d with a scipy reference for random kernels, the Haar buffers with their values,
the Haar modules with their upfirdn2d definitions, the non-upsampling modulated conv with
its formula, the fused and shared-weight paths with each other, and the losses (in
tests/test_cdtg_training.py) with their formulas. What is new here: the generator's own
resampling modules (kernel normalisation, up-factor gain, pads, pixel alignment), the
upsampling modulated conv against a reference of its own, the Haar bands' meaning and
orthonormality, ToRGB / FromRGB in the wavelet domain, equalised learning rate and
lr_mul, and the full generator, mapping network, style mixing, discriminator and path
length against the references.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from CDTG.layers import Blur, ConvLayer, Downsample, EqualLinear, FromRGB, ModulatedConv2d, ToRGB, Upsample
from CDTG.losses import d_logistic_loss, d_r1_loss, g_nonsaturating_loss, g_path_regularize
from CDTG.ops import HaarTransform, InverseHaarTransform, upfirdn2d
from CDTG.swagan import Discriminator, Generator
from CDTG.trainer import accumulate

SQRT2 = math.sqrt(2)
TAPS = (1.0, 3.0, 3.0, 1.0)


# ----- references ---------------------------------------------------------------------------

def blur_kernel_reference(gain=1.0):
    """StyleGAN2's [1, 3, 3, 1] low-pass, separable, sum `gain`."""
    taps = torch.tensor(TAPS, dtype=torch.float64)
    return torch.outer(taps, taps) / 64 * gain


def upfirdn2d_reference(x, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample by zero insertion, pad (negative crops), filter by true convolution, keep
    every `down`-th sample, written as the operator's matrix: output o along an axis reads
    input n through tap kernel[o * down + K - 1 - pad0 - n * up] when that index lies in
    [0, K) (the kernel flipped: convolution, not correlation)."""
    x0, x1, y0, y1 = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])
    kernel = kernel.to(x.dtype)

    def taps(size, length, pad0, pad1):
        out = (size * up + pad0 + pad1 - length) // down + 1
        index = (torch.arange(out)[:, None] * down + length - 1 - pad0 - torch.arange(size)[None, :] * up)
        valid = (index >= 0) & (index < length)
        return index.clamp(0, length - 1), valid

    rows, row_valid = taps(x.shape[2], kernel.shape[0], y0, y1)
    cols, col_valid = taps(x.shape[3], kernel.shape[1], x0, x1)
    matrix = kernel[rows[:, :, None, None], cols[None, None, :, :]]
    matrix = matrix * (row_valid[:, :, None, None] & col_valid[None, None, :, :])
    return torch.einsum("ynxm,bcnm->bcyx", matrix, x)


def correlate_reference(x, weight, pad=0, stride=1):
    """Cross-correlation (what a CNN "convolution" computes) as a sum of shifted slices."""
    x = F.pad(x, [pad] * 4)
    size = weight.shape[-1]
    out_h = (x.shape[2] - size) // stride + 1
    out_w = (x.shape[3] - size) // stride + 1
    out = 0
    for dy in range(size):
        for dx in range(size):
            window = x[:, :, dy: dy + stride * (out_h - 1) + 1: stride, dx: dx + stride * (out_w - 1) + 1: stride]
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, dy, dx], window)
    return out


def haar_reference(x):
    """Orthonormal 2x2 Haar analysis with the official band order and signs: for a block
    [[a, b], [c, d]], ll = (a+b+c+d)/2, lh = (a+b-c-d)/2 (top minus bottom), hl = (a-b+c-d)/2
    (left minus right), hh = (a-b-c+d)/2; band-major channels (all ll, then lh, hl, hh)."""
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    return torch.cat([(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], 1)


def inverse_haar_reference(bands):
    """The transpose (= inverse) of haar_reference."""
    ll, lh, hl, hh = bands.chunk(4, 1)
    batch, channels, height, width = ll.shape
    out = bands.new_zeros(batch, channels, 2 * height, 2 * width)
    out[:, :, 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[:, :, 0::2, 1::2] = (ll + lh - hl - hh) / 2
    out[:, :, 1::2, 0::2] = (ll - lh + hl - hh) / 2
    out[:, :, 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


def upsample_reference(x):
    """2x upsampling: zero insertion, [1,3,3,1] filter of gain 4, centred (pads 2, 1)."""
    return upfirdn2d_reference(x, blur_kernel_reference(4.0), up=2, pad=(2, 1))


def downsample_reference(x):
    """2x downsampling: [1,3,3,1] filter of gain 1, centred (pads 1, 1), every 2nd sample."""
    return upfirdn2d_reference(x, blur_kernel_reference(), down=2, pad=(1, 1))


def lrelu_reference(x, bias=None):
    """leaky ReLU (slope 0.2) of x + bias times sqrt(2)."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return torch.where(x >= 0, x, 0.2 * x) * SQRT2


def equal_linear_reference(x, weight, bias, lr_mul=1.0, activate=False):
    """Equalised linear layer: weight * lr_mul / sqrt(fan_in), bias * lr_mul."""
    out = x @ (weight * lr_mul / math.sqrt(weight.shape[1])).t()
    if activate:
        return lrelu_reference(out, bias * lr_mul)
    return out + bias * lr_mul


def equal_conv_reference(x, weight, bias=None, pad=0, stride=1):
    out = correlate_reference(x, weight / math.sqrt(weight[0].numel()), pad=pad, stride=stride)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def modulated_conv_reference(x, w, p, name, demodulate=True, upsample=False):
    """StyleGAN2's modulated convolution, one sample at a time: s = affine(w); weight
    scaled by 1/sqrt(fan_in) and by s per input channel; demodulated by
    1/sqrt(sum over (in, ky, kx) of its square + 1e-8). The upsampling layer is rosinality's
    (and so the official checkpoints'): a stride-2 transposed convolution (zero insertion,
    then a true convolution with the kernel) followed by the [1,3,3,1] blur of gain 4 with
    pads (1, 1)."""
    style = equal_linear_reference(w, p[f"{name}.modulation.weight"], p[f"{name}.modulation.bias"])
    weight = p[f"{name}.weight"][0]
    size = weight.shape[-1]
    outs = []
    for n in range(x.shape[0]):
        wn = weight / math.sqrt(weight[0].numel()) * style[n].view(1, -1, 1, 1)
        if demodulate:
            wn = wn / torch.sqrt(wn.pow(2).sum([1, 2, 3], keepdim=True) + 1e-8)
        xn = x[n: n + 1]
        if upsample:
            zeros = xn.new_zeros(1, xn.shape[1], 2 * xn.shape[2] - 1, 2 * xn.shape[3] - 1)
            zeros[:, :, ::2, ::2] = xn
            out = correlate_reference(zeros, wn.flip([2, 3]), pad=size - 1)  # full true convolution
            out = upfirdn2d_reference(out, blur_kernel_reference(4.0), pad=(1, 1))
        else:
            out = correlate_reference(xn, wn, pad=size // 2)
        outs.append(out)
    return torch.cat(outs)


def styled_conv_reference(x, w, noise, p, name, upsample=False):
    """Modulated conv, + per-layer scalar weight * noise (one map broadcast over channels),
    + bias, leaky ReLU, gain sqrt(2)."""
    out = modulated_conv_reference(x, w, p, f"{name}.conv", upsample=upsample)
    out = out + p[f"{name}.noise.weight"] * noise
    return lrelu_reference(out, p[f"{name}.activate.bias"])


def to_rgb_reference(x, w, skip, p, name):
    """1x1 modulated conv (no demodulation) to the 12 wavelet channels + bias, plus the
    previous wavelet image upsampled in pixel space (inverse Haar, upsample, Haar)."""
    out = modulated_conv_reference(x, w, p, f"{name}.conv", demodulate=False) + p[f"{name}.bias"]
    if skip is not None:
        out = out + haar_reference(upsample_reference(inverse_haar_reference(skip)))
    return out


def mapping_reference(z, labels, p, n_mlp, lr_mul):
    """z + label embedding, pixel norm, n_mlp equalised layers with lr_mul and leaky ReLU."""
    x = z + p["label_emb.weight"][labels[: z.shape[0]]]
    x = x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)
    for layer in range(1, n_mlp + 1):
        x = equal_linear_reference(x, p[f"style.{layer}.weight"], p[f"style.{layer}.bias"], lr_mul, activate=True)
    return x


def synthesis_reference(latents, noises, p, size):
    """SWAGAN synthesis from W+ [N, n_latent, dim]: constant 4x4 input, conv at 4x4 (w0),
    ToRGB (w1); then per resolution an upsampling conv (w_i), a conv (w_i+1) and a ToRGB
    (w_i+2), i += 2; the wavelet image (half resolution) goes through the inverse Haar."""
    x = p["input.input"].expand(latents.shape[0], -1, -1, -1)
    x = styled_conv_reference(x, latents[:, 0], noises[0], p, "conv1")
    skip = to_rgb_reference(x, latents[:, 1], None, p, "to_rgb1")
    for block in range(int(math.log2(size)) - 3):
        i = 2 * block + 1
        x = styled_conv_reference(x, latents[:, i], noises[i], p, f"convs.{2 * block}", upsample=True)
        x = styled_conv_reference(x, latents[:, i + 1], noises[i + 1], p, f"convs.{2 * block + 1}")
        skip = to_rgb_reference(x, latents[:, i + 2], skip, p, f"to_rgbs.{block}")
    return inverse_haar_reference(skip)


def conv_layer_reference(x, p, name, size, downsample=False):
    """[blur with pads (2, 2) for a 3x3 kernel, stride 2] or 'same' padding; equalised
    conv without bias; bias + leaky ReLU * sqrt(2)."""
    if downsample:
        x = upfirdn2d_reference(x, blur_kernel_reference(), pad=(2, 2))
        out = equal_conv_reference(x, p[f"{name}.1.weight"], stride=2)
        return lrelu_reference(out, p[f"{name}.2.bias"])
    out = equal_conv_reference(x, p[f"{name}.0.weight"], pad=size // 2)
    return lrelu_reference(out, p[f"{name}.1.bias"])


def discriminator_reference(image, labels, p, size, group=4):
    """SWAGAN D: Haar; per block FromRGB (the wavelet image halved in pixel space from the
    second block on: inverse Haar, downsample, Haar; 1x1 conv + activation, added to the
    features) then ConvBlock (3x3 conv, blurred stride-2 3x3 conv); the last FromRGB at 4x4;
    TGN's label map (embedding broadcast over 4x4, concatenated, 3x3 conv); minibatch stddev
    over groups of samples n, n + N/G, ...; 3x3 conv; two equalised linear layers."""
    wavelet = haar_reference(image)
    blocks = int(math.log2(size)) - 3
    out = None
    for block in range(blocks + 1):
        if block > 0:
            wavelet = haar_reference(downsample_reference(inverse_haar_reference(wavelet)))
        from_rgb = conv_layer_reference(wavelet, p, f"from_rgbs.{block}.conv", 1)
        out = from_rgb if out is None else out + from_rgb
        if block < blocks:
            out = conv_layer_reference(out, p, f"convs.{block}.conv1", 3)
            out = conv_layer_reference(out, p, f"convs.{block}.conv2", 3, downsample=True)
    label_map = p["label_emb.weight"][labels][:, :, None, None].expand(-1, -1, 4, 4)
    out = conv_layer_reference(torch.cat([out, label_map], 1), p, "fusion_conv", 3)
    batch = out.shape[0]
    members = out.view(group, batch // group, *out.shape[1:])  # member m of group j: sample m * N/G + j
    std = torch.sqrt(members.var(0, unbiased=False) + 1e-8).mean([1, 2, 3])
    std_map = std.repeat(group).view(batch, 1, 1, 1).expand(-1, 1, 4, 4)
    out = conv_layer_reference(torch.cat([out, std_map], 1), p, "final_conv", 3)
    out = equal_linear_reference(out.flatten(1), p["final_linear.0.weight"], p["final_linear.0.bias"],
                                 activate=True)
    return equal_linear_reference(out, p["final_linear.1.weight"], p["final_linear.1.bias"])


# ----- helpers --------------------------------------------------------------------------------

def randomised(module, seed=0):
    """The module in float64 with every parameter drawn at random: zero initial biases and
    noise weights, and the unit modulation bias, would hide slips in their use."""
    module = module.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return module


def params(module, prefix=""):
    """The module's parameters and buffers by name (as in the official state dicts)."""
    return {f"{prefix}{name}": value.detach() for name, value in module.state_dict().items()}


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def close_to_haar(actual, expected):
    """For the Haar modules themselves: their buffers hold the float32 products of
    1/sqrt(2) (0.49999997, as the official buffers), 6e-8 from the exact 1/2 of the
    references; compared relative to the largest value."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def exact_haar(module):
    """The module with its Haar buffers set to exactly +-1/2 (their float32 values,
    rounded), so that whole models can be compared with the references at float64
    precision; the Haar modules themselves are compared with close_to_haar."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (HaarTransform, InverseHaarTransform)):
                for band in layer.buffers():
                    band.copy_(band.sign() / 2)
    return module


SMALL_G = dict(style_dim=6, n_mlp=2, num_classes=3, channel_max=5, lr_mlp=0.01)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return exact_haar(randomised(Generator(32, **SMALL_G))).eval()


# ----- 1. upfirdn2d and the generator's resampling ------------------------------------------

@pytest.mark.parametrize("up, down, pad, shape", [
    (2, 1, (2, 1), (5, 3)),          # the generator's Upsample
    (1, 2, (1, 1), (6, 4)),          # the discriminator's Downsample
    (1, 1, (1, 1), (5, 4)),          # the up-conv's blur
    (1, 1, (2, 2), (6, 7)),          # the down-conv's blur
    (2, 1, (1, 0), (3, 4)),          # inverse Haar band
    (1, 2, (0, 0), (4, 6)),          # Haar band
    (2, 1, (0, 3, -1, 2), (4, 3)),   # (x0, x1, y0, y1): per-axis pads and a crop
    (1, 2, (3, -1, 1, 0), (7, 5)),
])
def test_upfirdn2d_matches_the_operator_matrix(up, down, pad, shape):
    """Asymmetric kernel, non-square inputs: a correlation (kernel not flipped), swapped
    axes of a 4-entry pad, or zeros inserted before instead of after the samples differ."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *shape, generator=generator, dtype=torch.float64)
    kernel = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    if pad in ((1, 0), (0, 0)):
        kernel = kernel[:2, :2]
    out = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    expected = upfirdn2d_reference(x, kernel, up, down, pad)
    assert out.shape == expected.shape
    close(out, expected)


def test_resampling_modules_use_the_normalised_kernel_its_gain_and_centred_pads():
    """Upsample: kernel sum 4 (up factor squared), pads (2, 1); Downsample: sum 1, pads
    (1, 1); the up-conv's Blur: sum 4, pads (1, 1); the down-conv's Blur: sum 1, pads (2, 2)."""
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    up, down = Upsample(TAPS).double(), Downsample(TAPS).double()
    close(up(x), upsample_reference(x))
    close(down(x), downsample_reference(x))
    up_conv_blur = ModulatedConv2d(3, 3, 3, style_dim=2, upsample=True).blur.double()
    down_conv_blur = ConvLayer(3, 3, 3, downsample=True)[0].double()
    assert isinstance(down_conv_blur, Blur)
    close(up_conv_blur(x), upfirdn2d_reference(x, blur_kernel_reference(4.0), pad=(1, 1)))
    close(down_conv_blur(x), upfirdn2d_reference(x, blur_kernel_reference(), pad=(2, 2)))
    assert up(x).shape == (2, 3, 12, 8) and down(x).shape == (2, 3, 3, 2)
    # Gain: a constant stays constant away from the borders (a missing up^2 gives 1/4).
    constant = torch.full((1, 1, 6, 6), 0.7, dtype=torch.float64)
    close(up(constant)[..., 2:-2, 2:-2], torch.full((1, 1, 8, 8), 0.7, dtype=torch.float64))
    close(down(constant)[..., 1:-1, 1:-1], torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64))


def test_resampling_is_centred():
    """Centred pads make up- and downsampling commute with flipping the image; pads of
    (1, 2) or (3, 0) shift the result by a pixel."""
    x = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    for module in (Upsample(TAPS).double(), Downsample(TAPS).double()):
        close(module(x.flip([2, 3])), module(x).flip([2, 3]))


def test_the_up_convs_blur_lands_where_upsample_lands():
    """A modulated up-conv whose kernel is a centred delta (identity channels, unit style,
    no demodulation) is exactly Upsample: the main path and the ToRGB skip path put each
    upsampled pixel at the same place."""
    conv = ModulatedConv2d(3, 3, 3, style_dim=2, demodulate=False, upsample=True).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, :, 1, 1] = torch.eye(3, dtype=torch.float64) / conv.scale
        conv.modulation.weight.zero_()
        conv.modulation.bias.fill_(1.0)
    x, style = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    for fused in (True, False):
        conv.fused = fused
        close(conv(x, style), Upsample(TAPS).double()(x))


# ----- 2. Haar wavelets, ToRGB and FromRGB --------------------------------------------------

def test_haar_bands_are_the_block_sums_and_differences():
    """Catches lh and hl swapped, a band's sign flipped in both directions (which still
    reconstructs), a scale of 1/4 (the average) instead of the orthonormal 1/2."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    bands = HaarTransform().double()(x)
    close_to_haar(bands, haar_reference(x))
    # Orthonormal: energy kept (Parseval), and the inverse is the transpose.
    close_to_haar(bands.pow(2).sum(), x.pow(2).sum())
    coefficients = torch.randn(2, 12, 3, 4, dtype=torch.float64)
    close_to_haar(InverseHaarTransform().double()(coefficients), inverse_haar_reference(coefficients))
    close(inverse_haar_reference(haar_reference(x)), x)
    # Meaning of the bands: a vertical ramp (rows differ) lives in ll and lh only.
    ramp = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1).expand(1, 1, 6, 8)
    ll, lh, hl, hh = HaarTransform().double()(ramp).chunk(4, 1)
    close_to_haar(lh, torch.full_like(lh, -1.0))
    assert (hl == 0).all() and (hh == 0).all()


def test_to_rgb_adds_the_previous_wavelet_image_upsampled_in_pixel_space():
    torch.manual_seed(0)
    layer = exact_haar(randomised(ToRGB(4, style_dim=3)))
    x, style = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    skip = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    close(layer(x, style, skip), to_rgb_reference(x, style, skip, params(layer, "m."), "m"))
    first = randomised(ToRGB(4, style_dim=3, upsample=False))
    close(first(x, style), to_rgb_reference(x, style, None, params(first, "m."), "m"))


def test_from_rgb_halves_the_wavelet_image_in_pixel_space():
    torch.manual_seed(0)
    layer = exact_haar(randomised(FromRGB(5)))
    wavelet, features = torch.randn(2, 12, 8, 6, dtype=torch.float64), torch.randn(2, 5, 4, 3, dtype=torch.float64)
    halved, out = layer(wavelet, features)
    expected_halved = haar_reference(downsample_reference(inverse_haar_reference(wavelet)))
    close(halved, expected_halved)
    close(out, features + conv_layer_reference(expected_halved, params(layer, "m."), "m.conv", 1))
    first = randomised(FromRGB(5, downsample=False))
    same, out = first(wavelet)
    close(same, wavelet)
    close(out, conv_layer_reference(wavelet, params(first, "m."), "m.conv", 1))


# ----- 3. Modulated convolution, equalised learning rate -------------------------------------

@pytest.mark.parametrize("upsample, demodulate, kernel_size", [
    (False, True, 3), (True, True, 3), (True, False, 3), (False, False, 1)])
def test_modulated_conv_matches_the_reference_on_both_paths(upsample, demodulate, kernel_size):
    """Catches in the up-conv: the weight not transposed to (in, out), the blur without
    its gain 4 or with other pads, the demodulation over the wrong axes; in both: the style
    not applied per input channel, the scale 1/sqrt(out * k * k), eps other than 1e-8."""
    torch.manual_seed(0)
    conv = randomised(ModulatedConv2d(4, 3, kernel_size, style_dim=5, demodulate=demodulate, upsample=upsample))
    x, style = torch.randn(3, 4, 5, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = modulated_conv_reference(x, style, params(conv, "m."), "m", demodulate=demodulate, upsample=upsample)
    for fused in (True, False):
        conv.fused = fused
        close(conv(x, style), expected)


def test_demodulation_eps_is_1e_minus_8():
    """A tiny style makes the sum of squared weights comparable to eps: eps 1e-8 leaves
    about half of the unit norm, eps 1e-5 would leave almost nothing."""
    conv = ModulatedConv2d(2, 2, 1, style_dim=1).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.modulation.weight.zero_()
        conv.modulation.bias.fill_(1e-4)
    x = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    squared = 2 * (1e-4 * conv.scale) ** 2  # per output: sum over the 2 inputs, conv.scale = 1/sqrt(2)
    expected = 2 * 1e-4 * conv.scale / math.sqrt(squared + 1e-8)
    for fused in (True, False):
        conv.fused = fused
        out = conv(x, torch.zeros(1, 1, dtype=torch.float64))
        close(out, torch.full_like(out, expected))


def test_equalised_linear_with_lr_mul():
    """Stored weights N(0, 1/lr_mul^2), used as weight * lr_mul / sqrt(fan_in); the bias
    starts at bias_init and is used times lr_mul. Catches the init not divided by lr_mul
    (the mapping network 100x weaker), the bias used without lr_mul (it would learn 100x
    faster)."""
    torch.manual_seed(0)
    layer = EqualLinear(400, 300, lr_mul=0.01, activate=True)
    assert abs(layer.weight.std().item() * 0.01 - 1) < 0.02
    assert torch.equal(layer.bias, torch.zeros(300))
    assert torch.equal(EqualLinear(4, 3, bias_init=1).bias, torch.ones(3))
    layer = randomised(layer)
    x = torch.randn(2, 400, dtype=torch.float64)
    close(layer(x), equal_linear_reference(x, layer.weight, layer.bias, 0.01, activate=True))
    plain = randomised(EqualLinear(400, 3, lr_mul=0.5))
    close(plain(x), equal_linear_reference(x, plain.weight, plain.bias, 0.5))
    # Unit-variance inputs give unit-variance pre-activations at init, whatever lr_mul.
    fresh = EqualLinear(400, 300, lr_mul=0.01)
    assert abs(fresh(torch.randn(256, 400)).std().item() - 1) < 0.05


# ----- 4. the whole generator: mapping, mixing, noise, constant input, ToRGB chain -----------

def test_mapping_network_matches_the_reference(generator):
    z, labels = torch.randn(3, 6, dtype=torch.float64), torch.tensor([2, 0, 1])
    close(generator.get_latent(z, labels), mapping_reference(z, labels, params(generator), 2, 0.01))


def test_generator_synthesis_matches_the_reference_layer_for_layer(generator):
    """A distinct random w per layer and explicit noise maps: every layer's latent index
    (ToRGB shares the next block's first w), every noise map, the ToRGB skip chain and the
    final inverse Haar are checked."""
    latents = torch.randn(2, generator.n_latent, 6, dtype=torch.float64)
    noises = [torch.randn(2, 1, *shape[2:], dtype=torch.float64) for shape in generator.noise_shapes()]
    p = params(generator)
    expected = synthesis_reference(latents, noises, p, 32)
    assert expected.shape == (2, 3, 32, 32)
    for fused in (True, False):
        generator.set_fused_modconv(fused)
        image, _ = generator(latents, None, input_is_latent=True, noise=noises)
        close(image, expected)
    generator.set_fused_modconv(True)


def test_generator_forward_with_style_mixing_matches_the_reference(generator):
    """z -> W for each of two latents, the first for layers below the crossover, the
    second from it on; with the fixed noise buffers (randomize_noise=False)."""
    z1, z2, labels = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64),
                      torch.tensor([1, 2]))
    p = params(generator)
    w1, w2 = (mapping_reference(z, labels, p, 2, 0.01) for z in (z1, z2))
    latents = torch.stack([w1 if layer < 3 else w2 for layer in range(generator.n_latent)], 1)
    noises = [p[f"noises.noise_{i}"].expand(2, -1, -1, -1) for i in range(generator.num_layers)]
    image, returned = generator([z1, z2], labels, inject_index=3, randomize_noise=False, return_latents=True)
    close(returned, latents)
    close(image, synthesis_reference(latents, noises, p, 32))
    # The constant input is shared by every sample.
    assert torch.equal(generator.input(latents)[0], generator.input(latents)[1])


def test_path_lengths_match_those_of_the_reference_generator(generator):
    """The latents the generator returns are the ones its layers read: the path-length
    gradient through the project's generator equals the reference's."""
    latents = torch.randn(2, generator.n_latent, 6, dtype=torch.float64, requires_grad=True)
    noises = [torch.randn(2, 1, *shape[2:], dtype=torch.float64) for shape in generator.noise_shapes()]
    projection = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    image, returned = generator(latents, None, input_is_latent=True, noise=noises, return_latents=True)
    _, _, lengths = g_path_regularize(image, returned, torch.tensor(0.0, dtype=torch.float64), noise=projection)
    reference = synthesis_reference(latents, noises, params(generator), 32)
    (grad,) = torch.autograd.grad((reference * projection / 32).sum(), latents)
    close(lengths, grad.pow(2).sum(2).mean(1).sqrt())


def test_noise_injection_adds_one_map_per_sample_broadcast_over_channels():
    """Drawn noise is one [N, 1, H, W] map scaled by the layer's single learned weight,
    the same for every channel (StyleGAN2), not an independent map per channel."""
    from CDTG.layers import NoiseInjection

    layer = NoiseInjection()
    assert layer.weight.shape == (1,)
    with torch.no_grad():
        layer.weight.fill_(0.3)
    x = torch.randn(2, 4, 5, 5)
    added = layer(x) - x
    assert torch.allclose(added, added[:, :1].expand_as(added))
    assert not torch.allclose(added[0], added[1])
    noise = torch.randn(2, 1, 5, 5)
    close(layer(x, noise), x + 0.3 * noise, 1e-6)


# ----- the discriminator ------------------------------------------------------------------------

def test_discriminator_matches_the_reference():
    torch.manual_seed(0)
    discriminator = exact_haar(randomised(Discriminator(32, num_classes=3, label_dim=4, channel_max=5))).eval()
    images, labels = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    close(discriminator(images, labels), discriminator_reference(images, labels, params(discriminator), 32))


# ----- 5. losses, R1, EMA ---------------------------------------------------------------------------

def test_logistic_losses_are_the_definitions():
    """D: -log sigmoid(real) - log(1 - sigmoid(fake)); G (non-saturating): -log sigmoid(fake)."""
    real = torch.tensor([-3.0, -0.5, 0.2, 4.0], dtype=torch.float64)
    fake = torch.tensor([1.5, -2.0, 0.0, -6.0], dtype=torch.float64)
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    close(d_logistic_loss(real, fake), expected_d)
    close(g_nonsaturating_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_r1_is_the_batch_mean_of_the_squared_gradient_norm():
    """A non-linear D, D(x) = sum tanh(A x), whose input gradient differs per sample:
    R1 = mean_n |A^T (1 - tanh^2(A x_n))|^2 (the trainer applies gamma / 2 and the interval)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 3, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    pred = torch.tanh(x.flatten(1) @ a.t()).sum(1)
    grad = (1 - torch.tanh(x.detach().flatten(1) @ a.t()).pow(2)) @ a
    close(d_r1_loss(pred, x), grad.pow(2).sum(1).mean())


def test_ema_averages_parameters_only():
    """rosinality's accumulate: ema = d * ema + (1 - d) * p for every parameter; buffers
    (the fixed noise maps, the Haar filters) stay as they are."""
    torch.manual_seed(0)
    model, ema = Generator(16, **SMALL_G), Generator(16, **SMALL_G)
    before = {name: value.clone() for name, value in ema.state_dict().items()}
    accumulate(ema, model, 0.9)
    parameters = dict(model.named_parameters())
    for name, value in ema.state_dict().items():
        if name in parameters:
            close(value, 0.9 * before[name] + 0.1 * parameters[name].detach(), 1e-6)
        else:
            assert torch.equal(value, before[name]), name
