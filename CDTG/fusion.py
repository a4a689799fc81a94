"""Noise fusion: the generator's input latent mixes noise with a real image's feature.

    z = ratio * noise + (1 - ratio) * Linear(flatten(M_T layer3 feature of a real image))

with the real image of the same class as the fake's label. Training uses ratio 0.8,
generation 0.05 (the official defaults). The official code created this layer at random
in every run and never trained or saved it; here it trains with the generator and lives
in the checkpoint. Official checkpoints have none: `NoiseFusion.official_fallback` builds
one from a fixed seed, so such runs are at least reproducible.

`pool=K` (--fusion-pool K, off by default) average-pools the feature map to K x K before
the linear layer: at 256 px the faithful layer maps 1024 x 16 x 16 = 262,144 values to 512
(134M parameters, about 2 GiB with their gradients and Adam's state); K = 4 makes it
1024 x 4 x 4 (8.4M).
The checkpoint's fusion config records K, so generation rebuilds the same layer.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

FALLBACK_SEED = 20240701


class NoiseFusion(nn.Module):
    def __init__(self, feature_numel, latent_dim, pool=None, channels=None):
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

    def embed(self, feature):
        """Linear(flatten(feature map)), the map first pooled to pool x pool when pooling."""
        if self.pool:
            feature = F.adaptive_avg_pool2d(feature, self.pool)
        return self.project(feature.flatten(1))

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
