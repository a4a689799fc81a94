"""Class-conditional SWAGAN (StyleGAN2 in the Haar wavelet domain) used by CDTG.

State dicts match the official TGN checkpoints (`g`, `g_ema`, `d` in `200000.pt`) key for
key at the default configuration, and given the same weights, inputs and noise the forward
passes compute what the official code computes. Blocks follow rosinality's StyleGAN2
(`model.py`) and SWAGAN (`swagan.py`); the conditioning follows TGN's `CDTG/tgn.py`:

- Generator: `label_emb` (num_classes x style_dim) is added to z before the mapping network.
  Only z goes through the embedding: with `input_is_latent=True` the labels are ignored.
  Labels longer than the style batch are cut to it (the official path-length step passes
  the full label batch with a shrunken noise batch).
- Discriminator: `label_emb` (num_classes x label_dim) is broadcast over the final 4x4
  feature map, concatenated to it and fused back to its width by `fusion_conv` (3x3
  ConvLayer), then minibatch stddev, `final_conv`, `final_linear`. The official code also
  builds a `final_conv` that takes the label channels, but overwrites it before use; only
  the second one (in_channel + 1 inputs) exists in its checkpoints and here.

Where we differ or had to choose (official checkpoints load and compute the same):
- `mean_latent(n, labels=None)` and `get_latent(z, labels=None)` add the label embedding
  when labels are given; without labels they are the official label-free versions.
- `styles` may be a bare tensor (treated as one style); the official sampling call passes
  one and then iterates over its rows by accident.
- `channel_max` caps every width (default 512 = the official widths) so tests and CPU runs
  can build small models; `config` holds the constructor arguments for checkpoints.
- Keyword-only `num_classes` on the Generator: the official positional order
  (size, style_dim, num_classes, n_mlp) differs from ours and must not be mixed up silently.
"""
import math
import random

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
        batch = x.shape[0]
        weight = self.scale * self.weight.squeeze(0)
        style = self.modulation(style)
        x = x * style.view(batch, self.in_channel, 1, 1)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum over (in, ky, kx) of (weight * style)^2, without a per-sample weight
            power = style.square() @ weight.square().sum([2, 3]).t()
            out = out * torch.rsqrt(power + self.eps).view(batch, self.out_channel, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


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
        return self.activate(self.noise(self.conv(x, style), noise=noise))


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


class Generator(nn.Module):
    """Class-conditional SWAGAN generator; `forward` returns (image, latent or None)."""

    def __init__(self, size, style_dim=512, n_mlp=8, *, num_classes, channel_multiplier=2,
                 lr_mlp=0.01, blur_kernel=(1, 3, 3, 1), channel_max=512):
        super().__init__()
        check_size(size, smallest=8)
        self.config = dict(size=size, style_dim=style_dim, n_mlp=n_mlp, num_classes=num_classes,
                           channel_multiplier=channel_multiplier, lr_mlp=lr_mlp,
                           blur_kernel=list(blur_kernel), channel_max=channel_max)
        self.size = size
        self.style_dim = style_dim
        self.channels = official_channels(channel_multiplier, channel_max)
        # The last inverse Haar transform doubles the resolution: layers stop at size / 2.
        self.log_size = int(math.log2(size)) - 1
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        self.label_emb = nn.Embedding(num_classes, style_dim)
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True) for _ in range(n_mlp)])

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = self.channels[4]
        for log_resolution in range(3, self.log_size + 1):
            out_channel = self.channels[2 ** log_resolution]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim,
                                         upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel))
            in_channel = out_channel

        # Fixed noise maps for randomize_noise=False; they are part of the official state dict.
        self.noises = nn.Module()
        for layer_index, shape in enumerate(self.noise_shapes()):
            self.noises.register_buffer(f"noise_{layer_index}", torch.randn(shape))

        self.iwt = InverseHaarTransform()

    def set_fused_modconv(self, fused):
        """Choose the modulated-conv path; same function, and on an H100 the shared-weight
        path (False) made training steps 10-30% faster than the official fused default."""
        for module in self.modules():
            if isinstance(module, ModulatedConv2d):
                module.fused = fused

    def noise_shapes(self):
        """One noise map per styled conv: 4x4, then two per resolution from 8x8 on."""
        return [(1, 1, 2 ** ((layer_index + 5) // 2), 2 ** ((layer_index + 5) // 2))
                for layer_index in range(self.num_layers)]

    def make_noise(self):
        return [torch.randn(shape, device=self.input.input.device) for shape in self.noise_shapes()]

    def get_latent(self, z, labels=None):
        """Map z (plus the class embedding when labels are given) to W."""
        if labels is not None:
            z = z + self.label_emb(labels[: z.shape[0]])
        return self.style(z)

    def mean_latent(self, n_latent, labels=None):
        """Mean W over `n_latent` random z; `labels` (one class id or n ids) conditions it."""
        z = torch.randn(n_latent, self.style_dim, device=self.input.input.device)
        if labels is not None:
            labels = torch.as_tensor(labels, device=z.device).expand(n_latent)
        return self.get_latent(z, labels).mean(0, keepdim=True)

    def _latent_per_layer(self, styles, inject_index):
        if len(styles) < 2:
            if styles[0].ndim == 3:
                return styles[0]
            return styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
        if inject_index is None:
            inject_index = random.randint(1, self.n_latent - 1)
        first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        second = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
        return torch.cat([first, second], 1)

    def forward(self, styles, labels, return_latents=False, inject_index=None, truncation=1,
                truncation_latent=None, input_is_latent=False, noise=None, randomize_noise=True):
        if torch.is_tensor(styles):
            styles = [styles]
        if not input_is_latent:
            styles = [self.get_latent(z, labels) for z in styles]
        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if truncation < 1:
            styles = [truncation_latent + truncation * (style - truncation_latent) for style in styles]
        latent = self._latent_per_layer(styles, inject_index)

        out = self.conv1(self.input(latent), latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        layer = 1
        for up_conv, conv, up_noise, conv_noise, to_rgb in zip(
                self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = up_conv(out, latent[:, layer], noise=up_noise)
            out = conv(out, latent[:, layer + 1], noise=conv_noise)
            skip = to_rgb(out, latent[:, layer + 2], skip)
            layer += 2
        image = self.iwt(skip)
        return image, (latent if return_latents else None)


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


class Discriminator(nn.Module):
    """Class-conditional SWAGAN discriminator: images [N, 3, size, size] -> logits [N, 1]."""

    def __init__(self, size, num_classes, label_dim=512, channel_multiplier=2,
                 blur_kernel=(1, 3, 3, 1), channel_max=512):
        super().__init__()
        check_size(size, smallest=16)
        self.config = dict(size=size, num_classes=num_classes, label_dim=label_dim,
                           channel_multiplier=channel_multiplier, blur_kernel=list(blur_kernel),
                           channel_max=channel_max)
        channels = official_channels(channel_multiplier, channel_max)
        self.dwt = HaarTransform()
        self.from_rgbs = nn.ModuleList()
        self.convs = nn.ModuleList()
        # The wavelet image has half the resolution; blocks run from size / 2 down to 4.
        log_size = int(math.log2(size)) - 1
        in_channel = channels[size]
        for log_resolution in range(log_size, 2, -1):
            out_channel = channels[2 ** (log_resolution - 1)]
            self.from_rgbs.append(FromRGB(in_channel, downsample=log_resolution != log_size,
                                          blur_kernel=blur_kernel))
            self.convs.append(ConvBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.from_rgbs.append(FromRGB(channels[4], blur_kernel=blur_kernel))

        self.label_emb = nn.Embedding(num_classes, label_dim)
        self.stddev_group = 4
        self.stddev_feat = 1
        self.final_conv = ConvLayer(in_channel + 1, channels[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, channels[4], activate=True),
            EqualLinear(channels[4], 1),
        )
        self.fusion_conv = ConvLayer(in_channel + label_dim, in_channel, 3)

    def minibatch_stddev(self, out):
        """Append the mean std over groups of samples n, n + N/G, ... as one feature map."""
        batch, channel, height, width = out.shape
        group = min(batch, self.stddev_group)
        if batch % group:
            raise ValueError(f"Discriminator: batch size {batch} must be a multiple of {group}")
        stddev = out.view(group, -1, self.stddev_feat, channel // self.stddev_feat, height, width)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
        stddev = stddev.repeat(group, 1, height, width)
        return torch.cat([out, stddev], 1)

    def forward(self, image, labels):
        wavelet_image = self.dwt(image)
        out = None
        for from_rgb, conv in zip(self.from_rgbs, self.convs):
            wavelet_image, out = from_rgb(wavelet_image, out)
            out = conv(out)
        _, out = self.from_rgbs[-1](wavelet_image, out)

        label_map = self.label_emb(labels)[:, :, None, None].expand(-1, -1, *out.shape[2:])
        out = self.fusion_conv(torch.cat([out, label_map], 1))
        out = self.final_conv(self.minibatch_stddev(out))
        return self.final_linear(out.flatten(1))
