"""Images as the models read them: the official preprocessing and the Dataset of
(path, label) pairs. Apart from tgn.data (the dataset layout, and decoding one image), which
needs no torch, so that the stages that need no model (splits, preparers, reports) start
without it."""
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from tgn.data import load_image
from tgn.errors import UserError


def build_transform(image_size, train):
    """The official preprocessing up to the pixels' scaling: resize, then a horizontal flip
    when training. Images leave as uint8 (C, H, W) tensors: a quarter of float32's bytes
    through the workers' shared memory, pinning and the copy to the GPU. `normalize_pixels`
    finishes ToTensor + Normalize(0.5, 0.5) on the device (the engine calls it)."""
    steps = [transforms.Resize((image_size, image_size)), PixelTensor()]
    if train:
        steps.append(transforms.RandomHorizontalFlip())  # flips tensors and PIL images alike, same draw
    return transforms.Compose(steps)


class PixelTensor:
    """PIL image -> uint8 (C, H, W) tensor; a tensor (a --cache entry) passes as it is."""

    def __call__(self, image):
        return image if torch.is_tensor(image) else TF.pil_to_tensor(image)


def normalize_pixels(images):
    """uint8 pixels -> [-1, 1]: ToTensor's /255 and Normalize(0.5, 0.5)'s (x - 0.5) / 0.5,
    the same float operations in the same order, so the values are theirs bit for bit.
    The divisor is a tensor on the images' device: CUDA divides by a Python number as a
    product with its reciprocal, which misses ToTensor's quotient by one unit in the last
    place for some pixels (seen on an H200); a device tensor gets a true division. A fill, not
    a copy from the host, so the GPU is not waited for."""
    divisor = torch.full((), 255.0, device=images.device)
    return images.float().div_(divisor).sub_(0.5).div_(0.5)


SKIP_BAD_IMAGES = "fix or remove the file; scripts with --skip-bad-images can leave such files out"
# Generation writes each image whole (a temp file, then a rename) and a rerun fills the gaps
# (anno.txt included); evaluate.py's --skip-bad-images leaves out real images only.
REWRITE_GENERATED = ("delete it and run CDTG/generation.py again with the same flags, which writes the images "
                     "missing")


class ImageList(Dataset):
    """Images given as (path, label) pairs; `label` is the model's output index.

    `cache` (a tgn.cache.ResizeCache) serves images already resized to `image_size`, as
    uint8 (C, H, W) tensors. The error for an unreadable image ends with what its reader can
    do about it; samples from index `generated_from` on are generated images
    (Classification/train.py --extra), which generation writes again."""

    def __init__(self, samples, transform=None, image_size=None, cache=None, generated_from=None, draft=True):
        samples = list(samples)
        # Arrays, not a list of (str, int): DataLoader workers reading a list touch the
        # reference count of every item they read, which copies its memory page into each
        # worker (26 MB a worker more at 150k images, 1.7 GB over 8 GPUs' workers). The paths
        # are one buffer of their bytes and their offsets: an array of fixed width would take
        # the longest path's size for every one.
        encoded = [os.fsencode(str(path)) for path, _ in samples]
        self.path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.path_ends = np.cumsum([len(path) for path in encoded], dtype=np.int64)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.image_size = image_size
        self.draft = draft  # JPEGs decoded near image_size (tgn.data.load_image); False: in full, as the official code
        self.cache = cache
        self.generated_from = len(samples) if generated_from is None else generated_from

    def path(self, index):
        start = self.path_ends[index - 1] if index > 0 else 0
        return os.fsdecode(self.path_bytes[start:self.path_ends[index]].tobytes())

    @property
    def samples(self):
        """The (path, label) pairs, paths as strings (a new list at each use)."""
        return [(self.path(index), int(label)) for index, label in enumerate(self.labels)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        path, label = self.path(index), int(self.labels[index])
        try:
            image = self.cache.load(path) if self.cache is not None else \
                load_image(path, self.image_size if self.draft else None)
        except UserError as exc:
            hint = REWRITE_GENERATED if index >= self.generated_from else SKIP_BAD_IMAGES
            raise UserError(f"{exc} ({hint})") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.long)

    def targets(self):
        return self.labels.tolist()
