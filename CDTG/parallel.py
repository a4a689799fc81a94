"""What the CDTG loop needs to run the same on one process or N (torchrun).

- `FusedGenerator`: the noise fusion in front of the generator, one module, so that
  DistributedDataParallel averages the gradients of both (they share one optimiser).
- `StepNoise`: every random input a step feeds the models (latents, style-mixing noise and
  crossover layer, noise maps, path-length noise, the real images' flips) is drawn for the global batch
  from (seed, step), identically in every process, and each process keeps its share
  (positions rank, rank + N, ...; the same positions as its real images). N processes
  then see what one process would; what is not drawn here (ADA's augmentations) comes
  from each process's own generator, seeded from (seed, step, rank).
"""
import random

import torch
from torch import nn

from tgn import distributed as dist
from tgn.sampling import mixed_seed

# What else a step or an epoch seeds besides the shared draws, told apart in mixed_seed.
OWN_DRAWS, EPOCH_ORDER = 1, 2


class FusedGenerator(nn.Module):
    def __init__(self, generator, fusion):
        super().__init__()
        self.generator, self.fusion = generator, fusion

    def forward(self, latents, features, ratio, labels, **kwargs):
        # Fusion and mapping network in fp32 even under autocast (as StyleGAN2-ADA keeps its mapping).
        with torch.autocast(features.device.type, enabled=False):
            styles = [self.generator.get_latent(self.fusion(z, features.float(), ratio), labels) for z in latents]
        return self.generator(styles, labels, input_is_latent=True, **kwargs)


def step_seed(seed, step):
    return seed * 1_000_003 + step


def epoch_order_seed(seed, epoch):
    """The seed of the training images' order in an epoch, apart from every step's seeds on
    every device (a CPU generator reads only a seed's low 32 bits)."""
    return mixed_seed(seed, epoch, EPOCH_ORDER)


class StepNoise:
    def __init__(self, device, latent_dim, mixing, noise_shapes, n_latent):
        self.device, self.latent_dim, self.mixing, self.n_latent = device, latent_dim, mixing, n_latent
        self.noise_shapes = noise_shapes
        self.generator = torch.Generator(device=device)

    def reseed(self, seed, step):
        """Seed the shared draws, Python's `random` (style-mixing choices) and this process's
        own torch generators for the step: apart from the shared stream and from the other
        processes' on CPUs too, whose generator reads only a seed's low 32 bits."""
        base = step_seed(seed, step)
        self.generator.manual_seed(base)
        random.seed(base)
        torch.manual_seed(mixed_seed(seed, step, OWN_DRAWS, dist.rank()))

    def randn(self, batch, *shape):
        """This process's `batch` rows of a standard-normal draw for all processes."""
        draw = torch.randn(batch * dist.world_size(), *shape, generator=self.generator, device=self.device)
        return dist.shard(draw)

    def flips(self, batch):
        draw = torch.rand(batch * dist.world_size(), generator=self.generator, device=self.device)
        return dist.shard(draw) < 0.5

    def latents(self, batch):
        """One latent batch, or two (style mixing) with probability `mixing`, with the layer
        where the second takes over (None for one). The official generator draws that layer
        in its forward from the same `random` stream, after the same mixing draw, so the
        values are the official ones; drawn here, G's forward has no Python randomness,
        which would break its graph under --compile."""
        if self.mixing > 0 and random.random() < self.mixing:
            crossover = random.randint(1, self.n_latent - 1)
            return [self.randn(batch, self.latent_dim), self.randn(batch, self.latent_dim)], crossover
        return [self.randn(batch, self.latent_dim)], None

    def noise_maps(self, batch):
        return [self.randn(batch, *shape[1:]) for shape in self.noise_shapes]
