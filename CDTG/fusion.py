"""Noise fusion: the generator's input latent mixes noise with a real image's feature.

    z = ratio * noise + (1 - ratio) * Linear(flatten(M_T layer3 feature of a real image))

with the real image of the same class as the fake's label. Training uses ratio 0.8,
generation 0.05 (the official defaults). The official code created this layer at random
in every run and never trained or saved it; here it trains with the generator and lives
in the checkpoint. Official checkpoints have none: `NoiseFusion.official_fallback` builds
one from a fixed seed, so such runs are at least reproducible.
"""
import warnings

import torch
from torch import nn

FALLBACK_SEED = 20240701


class NoiseFusion(nn.Module):
    def __init__(self, feature_numel, latent_dim):
        super().__init__()
        self.config = {"feature_numel": int(feature_numel), "latent_dim": int(latent_dim)}
        self.project = nn.Linear(feature_numel, latent_dim)

    def forward(self, noise, feature, ratio):
        return ratio * noise + (1 - ratio) * self.project(feature.flatten(1))

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
