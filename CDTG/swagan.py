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

from CDTG.layers import (ConstantInput, ConvBlock, ConvLayer, EqualLinear, FromRGB, ModulatedConv2d, PixelNorm,
                         StyledConv, ToRGB, check_size, official_channels)
from CDTG.ops import HaarTransform, InverseHaarTransform

# The discriminator's minibatch standard deviation is taken over groups of this many
# samples (StyleGAN2's); a batch above it must be a multiple of it.
STDDEV_GROUP = 4


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
        """Choose the modulated-conv path (the same function). train.py and generation.py
        default to the shared-weight path (False): on an H100 it made the training step 15%
        and generation 1.6x faster than the official fused one."""
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
        # The first style below layer inject_index, the second from there on. A mask, not a
        # split, so that no shape depends on the index: --compile keeps one graph for all.
        first_layers = torch.arange(self.n_latent, device=styles[0].device) < inject_index
        return torch.where(first_layers[:, None], styles[0].unsqueeze(1), styles[1].unsqueeze(1))

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
        self.stddev_group = STDDEV_GROUP
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
