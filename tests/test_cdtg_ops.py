"""CDTG native ops against direct references, plus first and second derivatives."""
import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from torch.autograd import gradcheck, gradgradcheck
from torch.nn import functional as F

from CDTG.ops import (FusedLeakyReLU, HaarTransform, InverseHaarTransform, fused_leaky_relu,
                      upfirdn2d)
from CDTG.swagan import ModulatedConv2d

BANDS = ("ll", "lh", "hl", "hh")


def upfirdn2d_reference(x, kernel, up, down, pad):
    """Zero insertion, zero padding or cropping, true 2-D convolution, subsampling, in numpy."""
    x0, x1, y0, y1 = pad if len(pad) == 4 else (pad[0], pad[1], pad[0], pad[1])
    batch, channels, height, width = x.shape
    upsampled = np.zeros((batch, channels, height * up, width * up))
    upsampled[:, :, ::up, ::up] = x
    padded = np.pad(upsampled, ((0, 0), (0, 0), (max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0))))
    padded = padded[:, :, max(-y0, 0): padded.shape[2] - max(-y1, 0),
                    max(-x0, 0): padded.shape[3] - max(-x1, 0)]
    filtered = np.array([[convolve2d(plane, kernel, mode="valid") for plane in image] for image in padded])
    return filtered[:, :, ::down, ::down]


@pytest.mark.parametrize("up, down, pad, kernel_shape", [
    (1, 1, (1, 1), (3, 3)),            # Blur-like
    (2, 1, (2, 1), (4, 4)),            # Upsample
    (1, 2, (1, 1), (4, 4)),            # Downsample
    (2, 1, (1, 0), (2, 2)),            # inverse Haar band
    (1, 2, (0, 0), (2, 2)),            # Haar band
    (2, 2, (0, 1, 2, -1), (3, 4)),     # both, per-axis pads, a crop
    (3, 2, (-1, 2), (4, 3)),
    (1, 3, (-2, 1), (2, 2)),
    (1, 1, (-1, -2, 0, 3), (1, 3)),
])
def test_upfirdn2d_matches_direct_reference(up, down, pad, kernel_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    kernel = rng.standard_normal(kernel_shape)
    out = upfirdn2d(torch.from_numpy(x), torch.from_numpy(kernel), up=up, down=down, pad=pad)
    expected = upfirdn2d_reference(x, kernel, up, down, pad)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_upfirdn2d_float32_kernel_follows_input_dtype():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    out = upfirdn2d(x, torch.ones(2, 2) / 4, down=2)
    assert out.dtype == torch.float64 and out.shape == (1, 2, 2, 2)


def test_fused_leaky_relu_matches_formula():
    x = torch.randn(3, 5, 4, 2)
    bias = torch.randn(5)
    shifted = x + bias.view(1, 5, 1, 1)
    expected = torch.where(shifted >= 0, shifted, 0.1 * shifted) * 1.7
    torch.testing.assert_close(fused_leaky_relu(x, bias, 0.1, 1.7), expected)

    flat = torch.randn(4, 5)
    expected = torch.where(flat + bias >= 0, flat + bias, 0.2 * (flat + bias)) * 2 ** 0.5
    torch.testing.assert_close(fused_leaky_relu(flat, bias), expected)
    torch.testing.assert_close(fused_leaky_relu(flat), F.leaky_relu(flat, 0.2) * 2 ** 0.5)
    # The gain moves inside the leaky ReLU only when positive; a negative one is applied after.
    expected = torch.where(shifted >= 0, shifted, 0.1 * shifted) * -1.7
    torch.testing.assert_close(fused_leaky_relu(x, bias, 0.1, -1.7), expected)

    layer = FusedLeakyReLU(5)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert FusedLeakyReLU(5, bias=False).bias is None


def test_haar_buffers_have_official_names_and_values():
    forward, inverse = HaarTransform(), InverseHaarTransform()
    half = 0.5
    expected = {"ll": [[half, half], [half, half]], "lh": [[-half, -half], [half, half]],
                "hl": [[-half, half], [-half, half]], "hh": [[half, -half], [-half, half]]}
    assert list(dict(forward.named_buffers())) == list(BANDS)
    for band in BANDS:
        torch.testing.assert_close(getattr(forward, band), torch.tensor(expected[band]))
        sign = -1 if band in ("lh", "hl") else 1
        torch.testing.assert_close(getattr(inverse, band), sign * torch.tensor(expected[band]))


def test_haar_transforms_equal_their_upfirdn2d_definitions():
    forward, inverse = HaarTransform().double(), InverseHaarTransform().double()
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    bands = torch.cat([upfirdn2d(x, getattr(forward, band), down=2) for band in BANDS], 1)
    torch.testing.assert_close(forward(x), bands)

    coefficients = torch.randn(2, 12, 4, 5, dtype=torch.float64)
    pixels = sum(upfirdn2d(part, getattr(inverse, band), up=2, pad=(1, 0))
                 for part, band in zip(coefficients.chunk(4, 1), BANDS))
    torch.testing.assert_close(inverse(coefficients), pixels)


def test_haar_inverse_reconstructs_input():
    forward, inverse = HaarTransform(), InverseHaarTransform()
    x = torch.randn(2, 3, 16, 10)
    wavelets = forward(x)
    assert wavelets.shape == (2, 12, 8, 5)
    torch.testing.assert_close(inverse(wavelets), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward(inverse(wavelets)), wavelets, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("up, down, pad, size", [
    (2, 1, (2, 1), 4), (1, 2, (1, 1), 5), (2, 2, (1, -1), 4), (1, 3, (3, -2, 0, 4), 5), (3, 2, (5, 0), 3)])
def test_upfirdn2d_first_and_second_derivatives(up, down, pad, size):
    # upfirdn2d's gradient is itself an upfirdn2d: odd sizes, crops and pads wider than the
    # kernel check its adjoint padding.
    x = torch.randn(1, 2, size, size + 1, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 4, dtype=torch.float64)
    assert gradcheck(lambda t: upfirdn2d(t, kernel, up=up, down=down, pad=pad), (x,))
    assert gradgradcheck(lambda t: upfirdn2d(t, kernel, up=up, down=down, pad=pad), (x,))


def test_fused_leaky_relu_first_and_second_derivatives():
    # Keep x + bias away from 0, where the slope jumps and finite differences fail.
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_()
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(fused_leaky_relu, (x, bias))
    assert gradgradcheck(fused_leaky_relu, (x, bias))


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_modulated_conv_first_and_second_derivatives(upsample, fused):
    # Batch 2 exercises the per-sample grouped convolution of the fused path; fast_mode
    # checks random projections of the Jacobians, which keeps the test quick.
    conv = ModulatedConv2d(2, 2, 3, style_dim=3, upsample=upsample, fused=fused).double()
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    style = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(conv, (x, style), fast_mode=True)
    assert gradgradcheck(conv, (x, style), fast_mode=True)


def test_haar_first_and_second_derivatives():
    forward, inverse = HaarTransform().double(), InverseHaarTransform().double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: inverse(forward(t) ** 2), (x,))
