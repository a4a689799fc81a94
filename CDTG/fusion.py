"""Noise fusion: the generator's input latent mixes noise with a real image's feature.

    z = ratio * noise + (1 - ratio) * Linear(flatten(M_T layer3 feature of a real image))

with the real image of the same class as the fake's label. Training uses ratio 0.8,
generation 0.05 (the official defaults). The official code created this layer at random
in every run and never trained or saved it; here it trains with the generator and lives
in the checkpoint. Official checkpoints have none: `NoiseFusion.official_fallback` builds
one from a fixed seed, so such runs are at least reproducible.

A trained layer has StyleGAN2's equalised learning rate, with the mapping network's
`lr_mul` (lr_mlp, 0.01): weights stored at unit scale, multiplied by lr_mul / sqrt(inputs)
at run time. As a plain Linear under Adam, whose every step moves each weight by about
the learning rate whatever its gradient's size, one step would move each output by about
lr x (the sum of the non-negative layer3 features): about 200 at 256 px, so the feature
term would swamp the noise after the first step and the 0.8 / 0.2 mix would be lost.
Scaling by 1 / sqrt(inputs) makes the step independent of the layer's width, as for every
other layer of the generator. A config without `lr_mul` (official checkpoints, earlier
runs) is a plain Linear.

`pool=K` (--fusion-pool K, off by default) average-pools the feature map to K x K before
the linear layer: at 256 px the faithful layer maps 1024 x 16 x 16 = 262,144 values to 512
(134M parameters, about 2 GiB with their gradients and Adam's state); K = 4 makes it
1024 x 4 x 4 (8.4M).
The checkpoint's fusion config records K, so generation rebuilds the same layer.
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

FALLBACK_SEED = 20240701


class NoiseFusion(nn.Module):
    def __init__(self, feature_numel, latent_dim, pool=None, channels=None, lr_mul=None):
        super().__init__()
        self.config = {"feature_numel": int(feature_numel), "latent_dim": int(latent_dim)}
        self.pool = int(pool) if pool else None
        in_features = feature_numel
        if self.pool:
            if not channels:
                raise ValueError("NoiseFusion: pool needs the feature map's channel count")
            self.config.update(pool=self.pool, channels=int(channels))
            in_features = int(channels) * self.pool * self.pool
        self.project = nn.Linear(in_features, latent_dim)
        self.lr_mul = float(lr_mul) if lr_mul else None
        if self.lr_mul:
            self.config["lr_mul"] = self.lr_mul
            self.scale = self.lr_mul / math.sqrt(in_features)
            with torch.no_grad():  # the effective weights start at N(0, 1 / inputs), the bias at 0
                self.project.weight.normal_().div_(self.lr_mul)
                self.project.bias.zero_()

    def embed(self, feature):
        """Linear(flatten(feature map)), the map first pooled to pool x pool when pooling."""
        if self.pool:
            feature = F.adaptive_avg_pool2d(feature, self.pool)
        feature = feature.flatten(1)
        if not self.lr_mul:
            return self.project(feature)
        # Scaling the input rather than the weights: the same product without a scaled
        # copy of the 262144 x 512 weights on every call.
        return F.linear(feature * self.scale, self.project.weight, self.project.bias * self.lr_mul)

    def forward(self, noise, feature, ratio):
        return ratio * noise + (1 - ratio) * self.embed(feature)

    @classmethod
    def official_fallback(cls, feature_numel, latent_dim):
        warnings.warn(
            "the checkpoint holds no noise-fusion weights (official checkpoints never saved them); "
            f"using a fixed projection initialised with seed {FALLBACK_SEED}"
        )
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(FALLBACK_SEED)
            return cls(feature_numel, latent_dim)
        finally:
            torch.random.set_rng_state(state)
