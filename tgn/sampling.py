"""Which images each process reads in an epoch, in an order that depends only on (seed, epoch).

One sampler serves every DataLoader of the ResNet trainers, with or without torchrun:
the epoch's global order is drawn from (seed, epoch) as a single process would draw it,
and process r of N takes positions r, r + N, ... of it. With the per-process batch
(global batch / N), process r's k-th batch is then its share of the global k-th batch.

Training positions also carry a seed for the image's augmentation (SeededItems), so the
random flip of an image depends on (seed, epoch, position) alone: not on the number of
DataLoader workers, on persistent workers' history, or on the number of processes.
"""
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tgn import distributed as dist


def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def mixed_seed(*parts):
    """One 64-bit seed from non-negative integers, every bit depending on every part. torch's
    CPU generator keeps only the low 32 bits of a seed (CUDA's keeps all 64): streams told
    apart by an offset in the high bits (seed + rank * 2**40) would be one stream on CPUs."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1, dtype=np.uint64)[0])


class EpochSampler(Sampler):
    """This process's indices of one epoch; call set_epoch(epoch) before each epoch.

    shuffle=True: a permutation of range(size) (or, with `weights`, `size` draws with
    replacement, as WeightedRandomSampler does), each position paired with an
    augmentation seed; the list is padded to a multiple of the process count by
    repeating its start, like DistributedSampler. With `batch_size` (the global batch) and
    `drop_single`, a last batch that would leave a process a single image (at most N images
    over N processes) is left out of the epoch: for models whose last feature map is 1x1
    (images of 32 px or less), where BatchNorm cannot train on one image. Otherwise N
    processes train on the batches one would, the last one included (as the official
    loaders, which keep it). shuffle=False: indices in order, sharded without padding
    (confusion matrices are summed: every image counts once).

    `set_epoch(epoch, start_batch)` leaves out the epoch's first `start_batch` global
    batches: those a run stopped midway had trained (training samplers given their batch).
    """

    def __init__(self, size, *, shuffle, seed=0, epoch=0, weights=None, batch_size=None, drop_single=True):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, epoch
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.local_batch = batch_size // self.world if batch_size else None
        self.skipped = 0  # this process's images in the batches left out
        # The number of images an epoch trains on.
        last = size % batch_size if shuffle and batch_size and drop_single else 0
        self.used = size - last if 0 < last <= self.world and size > last else size

    def set_epoch(self, epoch, start_batch=0):
        if start_batch and not (self.shuffle and self.local_batch):
            raise ValueError("only a training sampler given its batch size starts an epoch midway")
        self.epoch, self.skipped = epoch, start_batch * (self.local_batch or 0)

    def __len__(self):
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world))
        return max(self.share() - self.skipped, 0)

    def share(self):
        """This process's positions of a whole training epoch, padding included."""
        return -(-self.used // self.world)

    def fewest_batches(self, batch_size):
        """The evaluation batches of `batch_size` every process has: as many as the smallest
        share gives (training shares are padded to one length)."""
        return -(-(self.size // self.world) // batch_size)

    def global_order(self):
        """The epoch's (index, augmentation seed) pairs, before sharding."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        else:
            order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return list(zip(order.tolist(), seeds.tolist()))[:self.used]

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank, self.size, self.world))
        order = self.global_order()
        padding = self.share() * self.world - len(order)
        order = order + (order * (padding // max(len(order), 1) + 1))[:padding]
        return iter(order[self.rank::self.world][self.skipped:])


class SeededItems(Dataset):
    """dataset[(index, seed)]: the item with torch's generator seeded by `seed` (then restored)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone, the one the transforms draw from and fork_rng restores:
            # torch.manual_seed also queues reseeds of every accelerator, a third of a
            # millisecond per image, half of a small model's data loading on a CPU.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
