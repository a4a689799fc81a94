"""Native resampling, activation and wavelet ops for the CDTG generator and discriminator.

The official code (rosinality's stylegan2-pytorch, reused by SatConcepts and TGN) compiles
CUDA kernels at import time. These are plain PyTorch equivalents: they run on CPU and GPU,
and give derivatives of any order (R1 and path-length regularisation need the second).

Semantics kept from the official ops:
- `upfirdn2d`: insert `up - 1` zeros after every sample, pad (negative pads crop), filter
  with the kernel as a true convolution (the kernel is flipped before correlating), keep
  every `down`-th sample. Output length: (n * up + pad0 + pad1 - k) // down + 1.
- `fused_leaky_relu`: leaky_relu(x + bias) * scale, bias broadcast over dimension 1.
- Haar transforms: the four 2x2 filters are buffers `ll`, `lh`, `hl`, `hh`; the forward
  transform is `upfirdn2d(x, filter, down=2)` per filter, bands concatenated band-major
  (all ll channels, then lh, hl, hh); the inverse splits the bands, applies
  `upfirdn2d(band, filter, up=2, pad=(1, 0))` with the lh and hl filters negated, and sums.
"""
import torch
from torch import nn
from torch.nn import functional as F


def _pads(pad):
    """(pad0, pad1) for both axes, or (x0, x1, y0, y1) as in the official op."""
    if len(pad) == 2:
        return pad[0], pad[1], pad[0], pad[1]
    if len(pad) == 4:
        return tuple(pad)
    raise ValueError(f"upfirdn2d: pad must have 2 or 4 entries, got {pad!r}")


def _upfirdn2d_native(x, kernel, up, down, pads):
    """The op itself, through depthwise (grouped) convolutions: channels never fold into
    the batch."""
    pad_x0, pad_x1, pad_y0, pad_y1 = pads
    channels = x.shape[1]
    kernel = kernel.to(x.dtype)  # bf16/fp16 gradients arrive outside autocast
    kernel_h, kernel_w = kernel.shape

    if up > 1:
        # conv_transpose with stride `up` is zero insertion followed by a true convolution
        # ("full" mode); cropping its borders gives the padded "valid" result.
        weight = kernel.expand(channels, 1, kernel_h, kernel_w)
        out = F.conv_transpose2d(x, weight, stride=up, groups=channels)
        out = F.pad(out, [pad_x0 - kernel_w + 1, up + pad_x1 - kernel_w,
                          pad_y0 - kernel_h + 1, up + pad_y1 - kernel_h])
        if down > 1:
            out = out[:, :, ::down, ::down]
        return out

    # Correlating with the flipped kernel is a true convolution; striding downsamples.
    weight = kernel.flip([0, 1]).expand(channels, 1, kernel_h, kernel_w)
    out = F.pad(x, [pad_x0, pad_x1, pad_y0, pad_y1])
    return F.conv2d(out, weight, stride=down, groups=channels)


class _UpFirDn2d(torch.autograd.Function):
    """upfirdn2d whose gradient is again an upfirdn2d (flipped kernel, up and down swapped).

    PyTorch differentiates a grouped convolution twice with one convolution per group:
    R1 and path-length regularisation through 512-channel blurs then launch thousands of
    kernels. Expressing the adjoint as this same op keeps every derivative order at one
    depthwise convolution. The kernel is a constant (a buffer), as in the official op.
    """

    @staticmethod
    def forward(ctx, x, kernel, up, down, pads):
        ctx.save_for_backward(kernel)
        ctx.up, ctx.down, ctx.pads, ctx.in_size = up, down, pads, x.shape[2:]
        return _upfirdn2d_native(x, kernel, up, down, pads)

    @staticmethod
    def backward(ctx, grad_out):
        (kernel,) = ctx.saved_tensors
        up, down = ctx.up, ctx.down
        pad_x0, _, pad_y0, _ = ctx.pads
        in_h, in_w = ctx.in_size
        out_h, out_w = grad_out.shape[2:]
        kernel_h, kernel_w = kernel.shape
        # Left pads undo the forward's; right pads make the result exactly the input size.
        adjoint_pads = (kernel_w - pad_x0 - 1, in_w * up - out_w * down + pad_x0 - up + 1,
                        kernel_h - pad_y0 - 1, in_h * up - out_h * down + pad_y0 - up + 1)
        grad_x = _UpFirDn2d.apply(grad_out, kernel.flip([0, 1]), down, up, adjoint_pads)
        return grad_x, None, None, None, None


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample by zero insertion, pad, FIR-filter (true convolution) and downsample NCHW `x`.

    `pad` is (pad0, pad1) for both axes or (x0, x1, y0, y1); negative values crop.
    """
    kernel = kernel.to(dtype=x.dtype, device=x.device)
    return _UpFirDn2d.apply(x, kernel, up, down, _pads(pad))


def fused_leaky_relu(x, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    """leaky_relu(x + bias) * scale with `bias` of shape [C] added along dimension 1.

    Computed as leaky_relu(scale * x + scale * bias) in two passes over `x` instead of three:
    a positive scale moves inside the leaky ReLU, which then runs in place.
    """
    if scale <= 0:  # the identity above needs a positive scale
        return F.leaky_relu(x + (0 if bias is None else bias.view(1, -1, *([1] * (x.ndim - 2)))),
                            negative_slope) * scale
    if bias is None:
        return F.leaky_relu_(x * scale, negative_slope)
    return F.leaky_relu_(torch.add(bias.view(1, -1, *([1] * (x.ndim - 2))) * scale, x, alpha=scale), negative_slope)


class FusedLeakyReLU(nn.Module):
    """Bias, leaky ReLU and the gain sqrt(2) that keeps activations at unit variance."""

    def __init__(self, channel, bias=True, negative_slope=0.2, scale=2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x):
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


def haar_filters():
    """The four orthonormal 2x2 Haar filters (ll, lh, hl, hh) of the official SWAGAN."""
    low = torch.full((2,), 2 ** -0.5)
    high = torch.tensor([-(2 ** -0.5), 2 ** -0.5])
    return (torch.outer(low, low), torch.outer(high, low),
            torch.outer(low, high), torch.outer(high, high))


class HaarTransform(nn.Module):
    """Forward Haar wavelet transform: [N, C, H, W] -> [N, 4C, H/2, W/2], bands ll, lh, hl, hh.

    Each band is a 2x2 stride-2 convolution; on the 2x2 pixel blocks given by
    pixel_unshuffle all four are one 4x4 matrix product.
    """

    def __init__(self):
        super().__init__()
        for name, band in zip(("ll", "lh", "hl", "hh"), haar_filters()):
            self.register_buffer(name, band)

    def forward(self, x):
        batch, channels, height, width = x.shape
        # upfirdn2d(down=2) with a 2x2 filter ignores a trailing odd row or column.
        x = x[:, :, : height // 2 * 2, : width // 2 * 2]
        # Row b of `bands` weights block position (row, col) = divmod(p, 2); the filters
        # are flipped because upfirdn2d convolves.
        bands = torch.stack([self.ll, self.lh, self.hl, self.hh]).flip([1, 2]).reshape(4, 4)
        blocks = F.pixel_unshuffle(x, 2).unflatten(1, (channels, 4))
        out = torch.einsum("bp,ncphw->nbchw", bands.to(x.dtype), blocks)
        return out.flatten(1, 2)


class InverseHaarTransform(nn.Module):
    """Inverse Haar wavelet transform: [N, 4C, h, w] (bands ll, lh, hl, hh) -> [N, C, 2h, 2w].

    The official inverse upsamples each band with `upfirdn2d(up=2, pad=(1, 0))`, which puts
    band value * filter[r, s] at output pixel (2i + r, 2j + s): a 4x4 matrix product
    followed by pixel_shuffle. The lh and hl buffers hold the negated filters, as in the
    official state dict.
    """

    def __init__(self):
        super().__init__()
        ll, lh, hl, hh = haar_filters()
        for name, band in zip(("ll", "lh", "hl", "hh"), (ll, -lh, -hl, hh)):
            self.register_buffer(name, band)

    def forward(self, x):
        bands = torch.stack([self.ll, self.lh, self.hl, self.hh]).reshape(4, 4)
        coefficients = x.unflatten(1, (4, -1))
        blocks = torch.einsum("bp,nbchw->ncphw", bands.to(x.dtype), coefficients)
        return F.pixel_shuffle(blocks.flatten(1, 2), 2)
