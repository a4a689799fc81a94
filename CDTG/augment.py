"""Adaptive discriminator augmentation (StyleGAN2-ADA, the "bgc" set) for CDTG training.

`AdaptiveAugment` tunes the probability p from the signs of D's outputs on real images, as
rosinality's `non_leaking.AdaptiveAugment` does; `augment(images, p)` applies the twelve
"bgc" augmentations, each independently per sample with probability p, differentiably.

Geometric path: the exact non-leaking pipeline of the official StyleGAN2-ADA code, in native
ops (`CDTG.ops.upfirdn2d` and indexing): reflect-pad the batch so the transformed image
stays inside real content, upsample 2x with the symlet-6 lowpass filter, sample bilinearly
(zero outside, like grid_sample with align_corners=False), filter and downsample 2x (`upfirdn2d` keeps the official op's padding and
true-convolution conventions). Because sym6 is an orthogonal wavelet filter, a sample
without a geometric transform comes back unchanged up to float rounding.

Where this differs from the official pipelines, and why:
- Parameters follow NVlabs' StyleGAN2-ADA, not rosinality's port. Rosinality draws the
  quarter turns from {0, 3} only, uses one shared value for the x and y shifts (so it only
  shifts along diagonals), and expresses shifts in [-1, 1] units (half-pixel "integer"
  steps, half of ADA's range). Here: 0-3 quarter turns, independent x and y shifts, integer
  shifts in whole pixels up to 12.5% of the size, fractional shifts with std 12.5%.
- ADA places original pixel x at 2x - 0.5 in the upsampled image; the sym6 filters' own
  delay (their centroid) puts it at 2x - 0.402. We use the filter's delay (`SYM6_DELAY`):
  linear content then comes out exact under every transform, whereas ADA's rounding shifts
  flipped and quarter-turned images by about 0.1 px (shifts cancel it; rotations and
  scalings keep a part). Measured on smooth content, flips and quarter turns come out about
  10x and rotations 2-3x more accurately; near the Nyquist frequency the two are alike.
- Flips and quarter turns use exact 0/1 matrices (not cos(pi / 2) = 6e-17), so the sampling
  grid lands on pixel centres. They still pass through the sym6 filters, and sym6 is not
  symmetric: on high-frequency content a flip differs from `torch.flip`, as in ADA.
- When the needed reflect padding exceeds the image, it is clamped to size - 1 and the rest
  is zeros, as in ADA; rosinality instead redraws all transforms until the padding fits,
  which biases the distribution towards small transforms.
- The whole geometric stage is skipped when no sample in the batch got a geometric
  transform, and `p == 0` returns the input tensor itself: both are exact shortcuts.
- Bilinear sampling gathers the four neighbours with `index_select` instead of calling
  `F.grid_sample`: R1 backpropagates through a gradient taken with create_graph=True, and
  grid_sample's double backward is missing in some PyTorch releases (2.11 raises
  "derivative for aten::grid_sampler_2d_backward is not implemented"). ADA patches this with
  a custom autograd function (grid_sample_gradfix); indexing has native derivatives of every
  order.
- Random parameters are drawn on the generator's device (the CPU by default), so computing
  the padding does not wait for the GPU.
"""
import math

import torch
from torch.nn import functional as F

from CDTG.ops import upfirdn2d
from tgn import distributed as dist

GEOMETRIC_KINDS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOUR_KINDS = ("brightness", "contrast", "lumaflip", "hue", "saturation")
BGC_KINDS = GEOMETRIC_KINDS + COLOUR_KINDS

# ADA's default strengths for "bgc" (shifts as fractions of the image size, scales in log2).
INT_TRANSLATE_MAX = 0.125
SCALE_STD = 0.2
ROTATE_MAX = math.pi
ANISO_STD = 0.2
FRAC_TRANSLATE_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5
HUE_MAX = math.pi
SATURATION_STD = 1.0

# Symlet-6 lowpass filter (sums to sqrt(2), orthogonal to its even shifts).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
# Where the filter's mass sits relative to its middle tap, in 2x pixels (about -0.402): the
# delay that the up- and downsampling add. Using it, rather than ADA's -0.5, makes every
# affine map reproduce linear content exactly, flips included.
SYM6_DELAY = sum(index * tap for index, tap in enumerate(SYM6)) / sum(SYM6) - (len(SYM6) - 1) / 2


class AdaptiveAugment:
    """Controller of the augmentation probability p (StyleGAN2-ADA's overfitting heuristic).

    `tune(real_pred)` accumulates sum(sign(D(real))) and the number of predictions. Once at
    least `update_every` have been seen, r_t = signs / count, and p moves by count / length
    (so p can cross [0, 1] in `length` images): up when r_t > target, down otherwise (a tie
    lowers p, as in rosinality), clamped to [0, 1]. Then the accumulators restart.

    `update_every` counts images. rosinality's train.py (the official code's base) updates p
    every 8 steps whatever its --ada_every flag says: 64 images at batch 8, which the trainer
    passes by default (CDTG.config.ada_interval). StyleGAN2-ADA uses 4 batches of 64 images
    (256). The step is count / length either way, so p moves at the same average rate; the
    interval sets how many predictions each update averages and how coarse it is.
    """

    def __init__(self, target=0.6, length=500_000, update_every=64, device="cpu"):
        self.target = target
        self.length = length
        self.update_every = update_every
        self.p = 0.0
        self.r_t_stat = 0.0
        # The sign sum stays on the device; it is read back only when p is updated.
        self.sign_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def tune(self, real_pred):
        """Under torchrun the signs and counts of all processes are summed every step, so every
        process holds the same state (and p) as one process seeing the global batch."""
        signs = torch.sign(real_pred.detach()).sum().to(self.sign_sum)
        self.sign_sum += dist.all_reduce_(signs)
        self.count += real_pred.shape[0] * dist.world_size()
        if self.count >= self.update_every:
            self.r_t_stat = self.sign_sum.item() / self.count
            direction = 1.0 if self.r_t_stat > self.target else -1.0
            self.p = min(1.0, max(0.0, self.p + direction * self.count / self.length))
            self.sign_sum.zero_()
            self.count = 0
        return self.p

    def state_dict(self):
        return {"p": self.p, "r_t_stat": self.r_t_stat, "sign_sum": self.sign_sum.item(), "count": self.count}

    def load_state_dict(self, state):
        self.p = float(state["p"])
        self.r_t_stat = float(state["r_t_stat"])
        self.sign_sum.fill_(state["sign_sum"])
        self.count = int(state["count"])


# ----- random transform matrices (float64, batched) --------------------------------------
def _matrix(rows, like):
    """Batched matrix from rows of scalars and (batch,) tensors shaped like `like`."""
    entries = [torch.as_tensor(entry, dtype=like.dtype, device=like.device).expand_as(like)
               for row in rows for entry in row]
    return torch.stack(entries, dim=-1).reshape(*like.shape, len(rows), len(rows[0]))


def _translate2d(tx, ty):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx, sy):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(cos, sin):
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], cos)


def _colour_linear(linear):
    """4x4 homogeneous colour matrices from (batch, 3, 3) linear parts."""
    out = torch.eye(4, dtype=linear.dtype, device=linear.device).repeat(linear.shape[0], 1, 1)
    out[:, :3, :3] = linear
    return out


class _Sampler:
    """Draws per-sample parameters, replacing them by the neutral value where not chosen."""

    def __init__(self, batch, generator):
        self.batch = batch
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")

    def _draw(self, draw, *shape):
        return draw((self.batch, *shape), generator=self.generator, dtype=torch.float64, device=self.device)

    def uniform(self, low, high, *shape):
        return low + (high - low) * self._draw(torch.rand, *shape)

    def normal(self, std, *shape):
        return std * self._draw(torch.randn, *shape)

    def log2_normal(self, std):
        return torch.exp2(self.normal(std))

    def integers(self, count):
        return torch.floor(self.uniform(0, count)).clamp(max=count - 1)

    def chosen(self, probability, value, neutral):
        mask = self._draw(torch.rand) < probability
        if value.dim() > 1:
            mask = mask.unsqueeze(-1)
        return torch.where(mask, value, torch.full_like(value, neutral))


def _compose(steps, batch, size, device):
    """steps[0] first: the product steps[-1] @ ... @ steps[0], identity when empty."""
    matrix = torch.eye(size, dtype=torch.float64, device=device).repeat(batch, 1, 1)
    for step in steps:
        matrix = step @ matrix
    return matrix


def sample_geometric(batch, height, width, p, kinds=GEOMETRIC_KINDS, generator=None):
    """Forward maps (batch, 3, 3) in pixel units, origin at the image centre, y down.

    Applied in ADA's order: x-flip, quarter turns, integer shift, isotropic scale, rotation,
    anisotropic scale, rotation, fractional shift. Each rotation happens with probability
    1 - sqrt(1 - p), so that at least one of the two happens with probability p.
    """
    draw = _Sampler(batch, generator)
    size = torch.tensor([width, height], dtype=torch.float64, device=draw.device)
    p_rotate = 1 - math.sqrt(max(0.0, 1 - p))
    steps = []

    def random_rotation():
        theta = draw.chosen(p_rotate, draw.uniform(-ROTATE_MAX, ROTATE_MAX), 0)
        return _rotate2d(torch.cos(theta), torch.sin(theta))

    if "xflip" in kinds:
        flip = draw.chosen(p, draw.integers(2), 0)
        steps.append(_scale2d(1 - 2 * flip, torch.ones_like(flip)))
    if "rotate90" in kinds:
        # Exact cosines and sines of quarter turns: the grid then lands on pixel centres.
        quarters = draw.chosen(p, draw.integers(4), 0).long()
        cos_table = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64, device=draw.device)
        steps.append(_rotate2d(cos_table[quarters], cos_table[(quarters + 3) % 4]))
    if "xint" in kinds:
        fraction = draw.chosen(p, draw.uniform(-INT_TRANSLATE_MAX, INT_TRANSLATE_MAX, 2), 0)
        shift = torch.round(fraction * size)
        steps.append(_translate2d(shift[:, 0], shift[:, 1]))
    if "scale" in kinds:
        scale = draw.chosen(p, draw.log2_normal(SCALE_STD), 1)
        steps.append(_scale2d(scale, scale))
    if "rotate" in kinds:
        steps.append(random_rotation())
    if "aniso" in kinds:
        stretch = draw.chosen(p, draw.log2_normal(ANISO_STD), 1)
        steps.append(_scale2d(stretch, 1 / stretch))
    if "rotate" in kinds:
        steps.append(random_rotation())
    if "xfrac" in kinds:
        shift = draw.chosen(p, draw.normal(FRAC_TRANSLATE_STD, 2), 0) * size
        steps.append(_translate2d(shift[:, 0], shift[:, 1]))
    return _compose(steps, batch, 3, draw.device)


def sample_colour(batch, p, kinds=COLOUR_KINDS, generator=None):
    """Colour maps (batch, 4, 4) acting on homogeneous RGB in [-1, 1], in ADA's order:
    brightness, contrast, luma flip, hue rotation, saturation."""
    draw = _Sampler(batch, generator)
    eye = torch.eye(3, dtype=torch.float64, device=draw.device)
    luma = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64, device=draw.device)
    onto_luma = torch.outer(luma, luma)
    # Cross-product matrix of the luma axis: the generator of rotations around it.
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=torch.float64, device=draw.device)
    cross = cross / math.sqrt(3)

    def per_sample(value):
        return value.view(batch, 1, 1)

    steps = []

    if "brightness" in kinds:
        offset = draw.chosen(p, draw.normal(BRIGHTNESS_STD), 0)
        shift = _colour_linear(eye.expand(batch, 3, 3))
        shift[:, :3, 3] = offset.unsqueeze(-1)
        steps.append(shift)
    if "contrast" in kinds:
        contrast = draw.chosen(p, draw.log2_normal(CONTRAST_STD), 1)
        steps.append(_colour_linear(per_sample(contrast) * eye))
    if "lumaflip" in kinds:
        # Householder reflection: luma mirrored around mid-grey (0), chroma kept.
        flip = draw.chosen(p, draw.integers(2), 0)
        steps.append(_colour_linear(eye - 2 * per_sample(flip) * onto_luma))
    if "hue" in kinds:
        theta = per_sample(draw.chosen(p, draw.uniform(-HUE_MAX, HUE_MAX), 0))
        rotation = eye + torch.sin(theta) * cross + (1 - torch.cos(theta)) * (cross @ cross)  # Rodrigues
        steps.append(_colour_linear(rotation))
    if "saturation" in kinds:
        saturation = per_sample(draw.chosen(p, draw.log2_normal(SATURATION_STD), 1))
        steps.append(_colour_linear(onto_luma + saturation * (eye - onto_luma)))
    return _compose(steps, batch, 4, draw.device)


# ----- applying the matrices ---------------------------------------------------------------
def apply_colour(images, matrix):
    """images (N, 3, H, W) in [-1, 1]; matrix (N, 4, 4) homogeneous colour maps."""
    matrix = matrix.to(images)
    linear, offset = matrix[:, :3, :3], matrix[:, :3, 3]
    return torch.einsum("nij,njhw->nihw", linear, images) + offset[:, :, None, None]


def _sample_bilinear(images, x, y):
    """Values of images (N, C, H, W) at fractional pixel indices x, y (N, P), as (N, C, P).

    Bilinear between the four neighbouring pixels; neighbours outside the image count as
    zero. Gathering rows of a (pixels, channels) table keeps the indices per pixel, not per
    channel, and index_select's derivatives of every order are native.
    """
    batch, channels, height, width = images.shape
    table = images.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    first_pixel = (torch.arange(batch, device=images.device) * (height * width)).unsqueeze(1)
    left, top = x.floor(), y.floor()
    sampled = 0
    for column in (left, left + 1):
        for row in (top, top + 1):
            weight = (1 - (x - column).abs()) * (1 - (y - row).abs())
            inside = (column >= 0) & (column <= width - 1) & (row >= 0) & (row <= height - 1)
            index = row.clamp(0, height - 1).long() * width + column.clamp(0, width - 1).long() + first_pixel
            neighbour = table.index_select(0, index.flatten()).view(batch, -1, channels)
            sampled = sampled + neighbour * (weight * inside).unsqueeze(-1)
    return sampled.transpose(1, 2)


def apply_geometric(images, matrix):
    """Resample images (N, C, H, W) by forward maps `matrix` (N, 3, 3), as in ADA.

    Pixel (x, y) of the output, in pixel units from the image centre, takes the input at
    matrix^-1 (x, y). Beyond the reflect padding the input counts as zero.
    """
    batch, channels, height, width = images.shape
    inverse = torch.linalg.inv(matrix.to(torch.float64))

    def constant(*values):
        return torch.tensor(values, dtype=torch.float64, device=inverse.device)

    def per_sample(value):
        return torch.full((batch,), float(value), dtype=torch.float64, device=inverse.device)

    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    filter_margin = len(SYM6) // 2  # original pixels that the 2x filters reach

    # Reflect-pad enough that every sampled point, plus filter support, is real content.
    corners = constant([-half_w, -half_h, 1], [half_w, -half_h, 1], [half_w, half_h, 1], [-half_w, half_h, 1])
    reached = (inverse[:, :2, :] @ corners.T).permute(1, 0, 2).reshape(2, -1)  # x and y of every corner
    margin = torch.cat([-reached.min(1).values, reached.max(1).values])  # left, top, right, bottom
    margin = margin - constant(half_w, half_h, half_w, half_h) + filter_margin
    margin = torch.minimum(margin.clamp(min=0), constant(width - 1, height - 1, width - 1, height - 1))
    left, top, right, bottom = margin.ceil().long().tolist()
    # Then zeros out to a frame of one of at most 17 widths (multiples of a sixteenth of
    # the side, at most side - 1), the same on every side: the convolutions below then see
    # a few shapes, not a new one nearly every batch. Each new shape costs cuDNN's autotuner
    # (cudnn.benchmark) a search, and on CPUs oneDNN caches a primitive per shape (host
    # memory grew ~10 KB a training step). The zeros are those upfirdn2d's own padding
    # adds, and the mask below drops what the filter spreads into them: same result.
    step_x, step_y = -(-width // 16), -(-height // 16)
    level = max(-(-max(left, right) // step_x), -(-max(top, bottom) // step_y))
    frame_x, frame_y = min(width - 1, level * step_x), min(height - 1, level * step_y)
    padded = F.pad(F.pad(images, [left, right, top, bottom], mode="reflect"),
                   [frame_x - left, frame_x - right, frame_y - top, frame_y - bottom])

    # Upsample 2x (true convolution, gain 2 per axis). The filter's centroid puts original
    # x at 2x + SYM6_DELAY there (ADA rounds this to 2x - 0.5).
    taps = len(SYM6)
    lowpass = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    kernel = torch.outer(lowpass, lowpass) / lowpass.sum() ** 2
    upsampled = upfirdn2d(padded, 4 * kernel, up=2, pad=((taps + 1) // 2, (taps - 2) // 2))
    inside_y = torch.zeros(upsampled.shape[2], dtype=images.dtype, device=images.device)
    inside_x = torch.zeros(upsampled.shape[3], dtype=images.dtype, device=images.device)
    inside_y[2 * (frame_y - top): 2 * (frame_y + height + bottom)] = 1
    inside_x[2 * (frame_x - left): 2 * (frame_x + width + right)] = 1
    upsampled = upsampled * (inside_y[:, None] * inside_x)
    to_2x = _translate2d(per_sample(SYM6_DELAY), per_sample(SYM6_DELAY)) @ _scale2d(per_sample(2), per_sample(2))
    inverse = to_2x @ inverse @ torch.linalg.inv(to_2x)

    # Sample a 2x output with `filter_margin` extra original pixels on every side, going
    # from output pixel indices to centred coordinates to input pixel indices.
    out_h, out_w = 2 * (height + filter_margin), 2 * (width + filter_margin)
    in_h, in_w = upsampled.shape[2:]
    to_index_in = _translate2d(per_sample((in_w - 1) / 2), per_sample((in_h - 1) / 2))
    from_index_out = _translate2d(per_sample(-(out_w - 1) / 2), per_sample(-(out_h - 1) / 2))
    index_map = (to_index_in @ inverse @ from_index_out)[:, :2, :].to(images)
    rows, cols = torch.meshgrid(torch.arange(out_h, dtype=images.dtype, device=images.device),
                                torch.arange(out_w, dtype=images.dtype, device=images.device), indexing="ij")
    output_points = torch.stack([cols.flatten(), rows.flatten(), torch.ones_like(cols.flatten())])
    source_x, source_y = (index_map @ output_points).unbind(1)
    sampled = _sample_bilinear(upsampled, source_x, source_y).view(batch, channels, out_h, out_w)

    # Filter with the adjoint (flipped) kernel, downsample 2x and crop the margin.
    crop = ((taps - 1) // 2 - filter_margin, (taps - 2) // 2 - filter_margin)
    return upfirdn2d(sampled, kernel.flip([0, 1]), down=2, pad=crop)


def augment(images, p, generator=None, kinds=BGC_KINDS):
    """Augment images (N, C, H, W) in [-1, 1]; each kind is applied per sample with probability p.

    Returns (augmented images, (geometric (N, 3, 3), colour (N, 4, 4))), or (images, None)
    when p == 0 (the same tensor, untouched); `geometric` are the forward maps of
    `sample_geometric`, `colour` those of `sample_colour`. Differentiable in `images`, twice.
    `generator` (a torch.Generator) makes the draws reproducible; `kinds` picks a subset of
    BGC_KINDS. Colour kinds need 3 channels. Computed and returned in fp32 (or fp64), autocast or not.
    """
    unknown = set(kinds) - set(BGC_KINDS)
    if unknown:
        raise ValueError(f"augment: unknown kinds {sorted(unknown)}; choose from {BGC_KINDS}")
    if p <= 0:
        return images, None
    batch, channels, height, width = images.shape
    geometric = sample_geometric(batch, height, width, p, kinds, generator)
    colour = sample_colour(batch, p, kinds, generator)

    # Always in fp32: under bf16 autocast the sampling grid's matrix products would round
    # positions by whole pixels (an error of about 1 on [-1, 1] images at 256 px).
    with torch.autocast(images.device.type, enabled=False):
        images = images.to(torch.promote_types(images.dtype, torch.float32))  # float64 stays (gradcheck)
        eye = torch.eye(3, dtype=geometric.dtype, device=geometric.device)
        if not torch.equal(geometric, eye.expand_as(geometric)):
            images = apply_geometric(images, geometric)
        if any(kind in kinds for kind in COLOUR_KINDS):
            if channels != 3:
                raise ValueError(f"augment: colour kinds need RGB images, got {channels} channels; "
                                 f"pass kinds=GEOMETRIC_KINDS")
            images = apply_colour(images, colour)
    return images, (geometric, colour)
