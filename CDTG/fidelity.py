"""Fidelity and diversity of generated images: FID, KID and within-class LPIPS.

FID here uses torchvision's Inception-v3 (IMAGENET1K_V1), not the TensorFlow Inception
of the original FID code (pytorch-fid's `pt_inception-2015-12-05`) that papers report:
weights and resizing differ, so these FIDs compare with each other, never with published
ones. Every report names its extractor (torchvision's, or a file by its SHA-256).
"""
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgn.checkpoint import load_all_but_classifier, load_checkpoint, state_dict_of
from tgn.errors import FETCH_WEIGHTS_HINT, UserError
from tgn.images import normalize_pixels
from tgn.io import file_sha256

INCEPTION_SIZE = 299
TORCHVISION_INCEPTION = "torchvision inception_v3 IMAGENET1K_V1"
TORCHVISION_INCEPTION_SHA256 = "0cc3c7bd"  # the prefix in its file name, inception_v3_google-0cc3c7bd.pth
OFFLINE_HINT = f"{FETCH_WEIGHTS_HINT} (TORCH_HOME)"


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), the reference FID.

    The reference code takes scipy's sqrtm of the product (and adds 1e-6 * I to both
    covariances when the product is singular). Only its trace is needed: the sum of the
    square roots of the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1), which has the
    product's eigenvalues and is symmetric, so two symmetric eigendecompositions give it,
    exactly for singular products too (fewer images than feature dimensions). The same
    value to about 1e-7 relative, and at 2048 dimensions several times faster (sqrtm took
    one to three minutes per FID on a 2-core CPU). A clearly negative eigenvalue (no real
    square root: not covariances) gives NaN with a warning.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    if trace_sqrt is None:
        warnings.warn("FID: the covariance square root is imaginary (a negative eigenvalue: degenerate features); "
                      "reported as n/a")
        return math.nan
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _trace_sqrt_product(sigma1, sigma2):
    """Tr(sqrt(sigma1 sigma2)) of two covariance matrices; None if either, or their
    product, has an eigenvalue below rounding's reach of zero."""
    values, vectors = np.linalg.eigh(sigma1)
    if _clearly_negative(values):
        return None
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = np.linalg.eigvalsh(root @ sigma2 @ root)
    if _clearly_negative(product):
        return None
    return float(np.sqrt(np.clip(product, 0, None)).sum())


def _clearly_negative(eigenvalues, relative=1e-6):
    return eigenvalues.min() < -relative * max(1.0, np.abs(eigenvalues).max())


def fid(features_a, features_b):
    """FID between two feature sets [N, D]; NaN when either has fewer than 2 rows."""
    if len(features_a) < 2 or len(features_b) < 2:
        return math.nan
    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (np.asarray(features_a, np.float64),
                                                                 np.asarray(features_b, np.float64))]
    return frechet_distance(*stats[0], *stats[1])


def _polynomial_kernel_sum(x, y, block, within=False):
    """The sum of (x_i . y_j / d + 1)^3 over all pairs, a block of rows at a time (bounded
    memory). `within` (y is x): each block of rows meets only the columns from its own on,
    the pairs right of the diagonal counting twice, so half the products are computed."""
    dimension, total = x.shape[1], 0.0
    for start in range(0, len(x), block):
        rows = x[start:start + block]
        kernel = (rows @ (y[start:] if within else y).T).div_(dimension).add_(1).pow_(3)
        if within:  # the block on the diagonal is symmetric: counted once; the rest twice
            total += 2 * float(kernel.sum()) - float(kernel[:, :len(rows)].sum())
        else:
            total += float(kernel.sum())
    return total


def kid(features_a, features_b, block=1024, device=None):
    """Kernel Inception Distance (Binkowski et al., 2018): the unbiased estimate of the
    squared MMD between two feature sets [N, D] with the kernel k(x, y) = (x . y / D + 1)^3.

    Unlike FID it has no bias from the image count, so small tail classes and sets of
    different sizes compare; it can be slightly negative. Every pair is used (no random
    subsets), so it is deterministic. NaN when either set has fewer than 2 rows.
    In float64, on `device` where it is a GPU: all pairs of 10,000 features of 2,048 take
    half a minute on a CPU, a fraction of a second on a GPU.
    """
    device = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
    x, y = (torch.as_tensor(np.asarray(f, np.float64), device=device) for f in (features_a, features_b))
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return math.nan
    dimension = x.shape[1]

    def within(z):  # the sum over pairs i != j
        diagonal = float(((z * z).sum(1) / dimension + 1).pow(3).sum())
        return _polynomial_kernel_sum(z, z, block, within=True) - diagonal

    return (within(x) / (m * (m - 1)) + within(y) / (n * (n - 1))
            - 2 * _polynomial_kernel_sum(x, y, block) / (m * n))


class FeatureExtractor:
    """`network` maps images in [-1, 1] at `input_size` px to features; `name` goes into reports."""

    def __init__(self, network, input_size, name):
        self.network, self.input_size, self.name = network.eval(), input_size, name

    def to(self, device):
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        size = (self.input_size, self.input_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.network(images).flatten(1).double().cpu().numpy()


def inception_pool_network():
    """Inception-v3 up to its 2048-d average pool; its input is in [-1, 1].

    torchvision's transform_input maps ImageNet-normalised input to [-1, 1], the range the
    Google weights expect; feeding [-1, 1] directly is the same network.
    """
    import torchvision

    network = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False,
                                              init_weights=False)
    network.fc = nn.Identity()
    return network


def load_inception(spec):
    """'torchvision' (downloaded when online, else found in TORCH_HOME), a weight file, or 'none'."""
    if spec == "none":
        return None
    network = inception_pool_network()
    if spec == "torchvision":
        from torchvision.models import Inception_V3_Weights

        try:
            state = Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as exc:  # offline, nothing cached
            raise UserError(f"cannot get torchvision's Inception-v3 weights ({type(exc).__name__}); "
                            f"{OFFLINE_HINT}, or pass --inception PATH or --inception none") from exc
        name = TORCHVISION_INCEPTION
    else:
        path = Path(spec)
        state = state_dict_of(load_checkpoint(path, "--inception weights"), f"--inception {path}")
        digest = file_sha256(path)
        name = (f"{TORCHVISION_INCEPTION} (file sha256 {digest})" if digest.startswith(TORCHVISION_INCEPTION_SHA256)
                else f"inception_v3 weights {path.name} sha256 {digest}")
    load_all_but_classifier(network, state, f"--inception {spec}", "torchvision's inception_v3")
    return FeatureExtractor(network, INCEPTION_SIZE, name)


def load_lpips(spec, random_trunk=False):
    """LPIPS v0.1 on AlexNet ('alex'), or None for 'none'.

    The linear layers ship with the lpips package; the AlexNet trunk is torchvision's
    ImageNet file (TORCH_HOME). random_trunk=True builds it without that file (tests).
    """
    if spec == "none":
        return None
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=`
        try:
            return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=random_trunk, verbose=False).eval()
        except Exception as exc:  # offline, nothing cached
            raise UserError(f"cannot get torchvision's AlexNet weights for LPIPS ({type(exc).__name__}); "
                            f"{OFFLINE_HINT}, or pass --lpips none") from exc


def sample_pairs(count, num_pairs, seed):
    """[P, 2] index pairs i != j: every pair when there are at most num_pairs, else random ones."""
    if count < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if count * (count - 1) // 2 <= num_pairs:
        return np.stack(np.triu_indices(count, 1), axis=1)
    rng = np.random.default_rng(seed)
    first = rng.integers(count, size=num_pairs)
    second = (first + rng.integers(1, count, size=num_pairs)) % count  # never equal to first
    return np.stack([first, second], axis=1)


@torch.no_grad()
def mean_pairwise_lpips(model, images, num_pairs, seed, batch_size=64):
    """Mean LPIPS over pairs of distinct images (uint8 [N, 3, H, W]); NaN below 2 images."""
    pairs = sample_pairs(len(images), num_pairs, seed)
    if len(pairs) == 0:
        return math.nan
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = torch.from_numpy(pairs[start:start + batch_size])
        first, second = (normalize_pixels(images[chunk[:, k]].to(device)) for k in (0, 1))
        total += model(first, second).sum().item()
    return total / len(pairs)
