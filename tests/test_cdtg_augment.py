"""ADA for CDTG: the augmentation pipeline and the controller of its probability."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn import functional as F

from CDTG.augment import (COLOUR_KINDS, GEOMETRIC_KINDS, AdaptiveAugment, _sample_bilinear, augment, sample_colour,
                          sample_geometric)
from CDTG.config import GanConfig, ada_interval


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def images(batch=4, size=12, seed=0, dtype=torch.float32):
    return torch.rand(batch, 3, size, size, generator=seeded(seed), dtype=dtype) * 2 - 1


def assert_near(actual, expected, atol=1e-5):
    # Plain arithmetic: torch.testing.assert_close imports torch.distributed (seconds).
    gap = (actual - expected).abs().max().item()
    assert gap <= atol, f"largest difference {gap:.3g} exceeds {atol:g}"


def linear(x, y):
    return 0.05 * x - 0.03 * y + 0.1


def centred_grid(size):
    centred = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(centred, centred, indexing="ij")
    return x, y


def ramp(batch=2, size=24):
    """A linear ramp: the sym6 pipeline reproduces linear content exactly away from borders."""
    return linear(*centred_grid(size)).expand(batch, 3, size, size).contiguous()


# ----- augment --------------------------------------------------------------------------------
def test_zero_probability_returns_the_input_itself():
    x = images()
    out, transforms = augment(x, 0.0, seeded(0))
    assert out is x and transforms is None


def test_full_probability_changes_every_image_and_keeps_shape_dtype_and_range():
    x = images()
    out, (geometric, colour) = augment(x, 1.0, seeded(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert ((out - x).flatten(1).abs().amax(1) > 1e-2).all()
    assert geometric.shape == (4, 3, 3) and colour.shape == (4, 4, 4)
    # Geometry alone only moves pixels (sym6 ringing aside); colour maps are linear.
    moved, _ = augment(x, 1.0, seeded(0), kinds=GEOMETRIC_KINDS)
    assert moved.abs().max() < 1.5


def test_bf16_autocast_and_bf16_images_give_the_fp32_augmentation():
    # CDTG augments inside the D and G passes' autocast, on bf16 fakes: positions rounded in
    # bf16 would move pixels by whole steps (an error near 1 at this size).
    x = images(batch=2, size=64)
    expected, _ = augment(x, 1.0, seeded(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_fp32, _ = augment(x, 1.0, seeded(3))
        from_bf16, _ = augment(x.bfloat16(), 1.0, seeded(3))
    assert_near(from_fp32.float(), expected)
    assert_near(from_bf16.float(), expected, atol=0.05)  # only the input's own bf16 rounding (1/128 at 1)
    assert from_fp32.dtype == from_bf16.dtype == torch.float32


def test_same_seed_same_result_other_seed_other_result():
    x = images()
    first, (geometric, colour) = augment(x, 0.7, seeded(5))
    again, (geometric_again, colour_again) = augment(x, 0.7, seeded(5))
    other, _ = augment(x, 0.7, seeded(6))
    assert torch.equal(first, again)
    assert torch.equal(geometric, geometric_again) and torch.equal(colour, colour_again)
    assert not torch.allclose(first, other)


def test_gradients_reach_the_input():
    x = images().requires_grad_(True)
    out, _ = augment(x, 1.0, seeded(1))
    (out * torch.randn(out.shape, generator=seeded(2))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_first_and_second_derivatives_match_finite_differences():
    # R1 differentiates D(augment(real)) with create_graph=True, then backpropagates again.
    x = images(batch=1, size=4, dtype=torch.float64).requires_grad_(True)

    def augmented(x):
        return augment(x, 1.0, seeded(3))[0]

    assert gradcheck(augmented, (x,), fast_mode=True)
    assert gradgradcheck(augmented, (x,), fast_mode=True)


def test_x_flip_only_flips_or_keeps_each_image():
    x = ramp()
    out, (geometric, _) = augment(x, 1.0, seeded(4), kinds=("xflip",))
    flipped = geometric[:, 0, 0] == -1
    assert flipped.any() and not flipped.all()  # seed chosen to give one of each
    interior = (slice(None), slice(7, -7), slice(7, -7))
    for image, original, was_flipped in zip(out, x, flipped):
        # Unflipped images pass through up/down sampling, which is the identity for sym6.
        expected = original.flip(-1) if was_flipped else original
        assert_near(image[interior], expected[interior], atol=1e-6)
    assert_near(out[~flipped], x[~flipped], atol=1e-9)


def test_rotations_and_scalings_map_pixels_as_their_matrix_says():
    # Output pixel (x, y), from the centre, shows the input at matrix^-1 (x, y).
    x = ramp(batch=6)
    kinds = ("xflip", "rotate90", "scale", "rotate", "aniso")
    out, (geometric, _) = augment(x, 1.0, seeded(0), kinds=kinds)
    grid_x, grid_y = centred_grid(24)
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)]).flatten(1)
    for image, matrix in zip(out, geometric):
        source_x, source_y, _ = (torch.linalg.inv(matrix) @ points).view(3, 24, 24)
        expected = linear(source_x, source_y)
        # The centre 4 x 4 (and the filters around it) stays inside the image after a 1.6x
        # zoom-out; beyond, reflect padding bends the ramp.
        assert_near(image[:, 10:-10, 10:-10], expected[10:-10, 10:-10].expand(3, 4, 4), atol=1e-6)


def test_geometric_augmentation_convolves_few_shapes_whatever_the_transforms(monkeypatch):
    """Each new input shape costs cuDNN's autotuner a search and, on CPUs, a cached oneDNN
    primitive (host memory grew every step): the padding takes one of at most 17 sizes."""
    import CDTG.augment

    shapes, upfirdn2d = set(), CDTG.augment.upfirdn2d

    def recording(x, *args, **kwargs):
        if kwargs.get("up") == 2:  # the padded images upsampled
            shapes.add(tuple(x.shape))
        return upfirdn2d(x, *args, **kwargs)

    monkeypatch.setattr(CDTG.augment, "upfirdn2d", recording)
    x = images(batch=2, size=32)
    for seed in range(60):
        for p in (0.2, 1.0):
            augment(x, p, seeded(seed), kinds=GEOMETRIC_KINDS)
    assert 1 < len(shapes) <= 17  # 90 different shapes before


def test_an_image_is_transformed_alike_whatever_else_is_in_its_batch():
    """The padding depends on the batch's largest transform; the result must not."""
    from CDTG.augment import apply_geometric

    x = images(batch=3, size=24, dtype=torch.float64)
    _, (geometric, _) = augment(x, 1.0, seeded(4), kinds=("scale", "rotate", "xfrac"))
    mild = torch.eye(3, dtype=torch.float64)
    mild[0, 2] = 0.3  # a small shift alone needs little padding
    alone = apply_geometric(x[:1], mild[None])
    beside_others = apply_geometric(x, torch.cat([mild[None], geometric[1:]]))
    assert_near(beside_others[:1], alone, atol=1e-12)


def test_integer_translation_moves_whole_pixels():
    x = images(batch=8, size=16, dtype=torch.float64)
    out, (geometric, _) = augment(x, 1.0, seeded(0), kinds=("xint",))
    for image, original, matrix in zip(out, x, geometric):
        dx, dy = int(matrix[0, 2]), int(matrix[1, 2])
        assert abs(dx) <= 2 and abs(dy) <= 2  # round(0.125 * 16)
        shifted = torch.roll(original, shifts=(dy, dx), dims=(1, 2))
        assert_near(image[:, 2:-2, 2:-2], shifted[:, 2:-2, 2:-2], atol=1e-9)


def test_colour_transforms_match_hand_computed_results():
    x = images(batch=6)
    grey = x.mean(1, keepdim=True)

    out, (_, colour) = augment(x, 1.0, seeded(0), kinds=("brightness",))
    offset = colour[:, 0, 3].float().view(-1, 1, 1, 1)
    assert (offset != 0).all() and torch.equal(colour[:, 0, 3], colour[:, 2, 3])
    assert_near(out, x + offset)  # every pixel and channel moves by one amount

    out, (_, colour) = augment(x, 1.0, seeded(0), kinds=("contrast",))
    assert_near(out, x * colour[:, 0, 0].float().view(-1, 1, 1, 1))

    out, (_, colour) = augment(x, 1.0, seeded(1), kinds=("lumaflip",))
    flipped = (colour[:, 0, 0] < 0.5).float().view(-1, 1, 1, 1)
    assert 0 < flipped.sum() < 6
    assert_near(out, x - 2 * flipped * grey)  # luma mirrored around mid-grey

    out, (_, colour) = augment(x, 1.0, seeded(0), kinds=("saturation",))
    saturation = (colour[:, 0, 0] - colour[:, 0, 1]).float().view(-1, 1, 1, 1)
    assert_near(out, grey + saturation * (x - grey))

    # Hue rotation turns chroma around the grey axis: grey level and chroma length stay.
    out, _ = augment(x, 1.0, seeded(0), kinds=("hue",))
    assert_near(out.mean(1, keepdim=True), grey)
    assert_near((out - grey).norm(dim=1), (x - grey).norm(dim=1))
    assert not torch.allclose(out, x)


def test_each_transform_is_drawn_at_adas_default_strength():
    """ADA's bgc strengths, measured on 4,000 draws at p = 1: brightness normal with std 0.2;
    contrast and saturation log2-normal with std 0.5 and 1; integer shifts up to 0.125 of the
    size; scaling and anisotropic scaling (s, 1/s) log2-normal with std 0.2; rotations
    uniform in (-pi, pi) (mean |angle| pi/2); fractional shifts normal with std 0.125 of the
    size. At p = 0 the colour map is the identity."""
    seed = torch.Generator().manual_seed(0)
    assert torch.equal(sample_colour(8, 0.0), torch.eye(4, dtype=torch.float64).expand(8, 4, 4))
    brightness = sample_colour(4000, 1.0, kinds=("brightness",), generator=seed)[:, 0, 3]
    assert brightness.std().item() == pytest.approx(0.2, abs=0.01)
    contrast = sample_colour(4000, 1.0, kinds=("contrast",), generator=seed)[:, 0, 0]
    assert torch.log2(contrast).std().item() == pytest.approx(0.5, abs=0.03)
    saturation = sample_colour(4000, 1.0, kinds=("saturation",), generator=seed)
    assert torch.log2(saturation[:, 0, 0] - saturation[:, 0, 1]).std().item() == pytest.approx(1.0, abs=0.05)
    shift = sample_geometric(4000, 32, 32, 1.0, kinds=("xint",), generator=seed)[:, :2, 2]
    assert shift.abs().max().item() == 4 and torch.equal(shift, shift.round())  # 0.125 x 32 px, whole pixels
    scale = sample_geometric(4000, 32, 32, 1.0, kinds=("scale",), generator=seed)
    assert torch.log2(scale[:, 0, 0]).std().item() == pytest.approx(0.2, abs=0.01)
    torch.testing.assert_close(scale[:, 0, 0], scale[:, 1, 1])
    rotation = sample_geometric(4000, 32, 32, 1.0, kinds=("rotate",), generator=seed)
    angle = torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])
    assert angle.abs().mean().item() == pytest.approx(math.pi / 2, abs=0.1)
    shift = sample_geometric(4000, 32, 32, 1.0, kinds=("xfrac",), generator=seed)[:, 0, 2]
    assert (shift.std() / 32).item() == pytest.approx(0.125, abs=0.01)
    aniso = sample_geometric(4000, 32, 32, 1.0, kinds=("aniso",), generator=seed)
    torch.testing.assert_close(torch.linalg.det(aniso), torch.ones(4000, dtype=torch.float64))
    assert torch.log2(aniso[:, 0, 0]).std().item() == pytest.approx(0.2, abs=0.01)


def test_colour_only_leaves_geometry_alone_and_checks_arguments():
    x = images()
    _, (geometric, _) = augment(x, 1.0, seeded(0), kinds=COLOUR_KINDS)
    assert torch.equal(geometric, torch.eye(3, dtype=geometric.dtype).expand(4, 3, 3))
    with pytest.raises(ValueError, match="unknown kinds"):
        augment(x, 0.5, kinds=("cutout",))
    with pytest.raises(ValueError, match="RGB"):
        augment(x[:, :1], 0.5)


# ----- AdaptiveAugment -------------------------------------------------------------------------
def test_p_rises_by_count_over_length_when_d_is_confident_on_reals():
    ada = AdaptiveAugment(target=0.6, length=1000, update_every=8)
    assert ada.tune(torch.ones(4, 1)) == 0.0  # 4 < 8 predictions: no update yet
    assert ada.tune(torch.ones(5, 1)) == pytest.approx(9 / 1000)  # steps by the 9 seen
    assert ada.r_t_stat == 1.0
    assert ada.count == 0 and ada.sign_sum.item() == 0.0


def test_p_falls_below_target_and_on_a_tie_and_stays_in_range():
    ada = AdaptiveAugment(target=0.5, length=100, update_every=8)
    ada.p = 0.5
    preds = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, -2.0]).view(8, 1)  # r_t = 0.5
    assert ada.tune(preds) == pytest.approx(0.42)
    assert ada.r_t_stat == 0.5
    assert ada.tune(-torch.ones(8, 1)) == pytest.approx(0.34)
    for _ in range(10):
        ada.tune(-torch.ones(8, 1))
    assert ada.p == 0.0
    for _ in range(20):
        ada.tune(torch.ones(8, 1))
    assert ada.p == 1.0


def test_p_moves_every_8_steps_by_default_as_in_the_official_code():
    for batch in (8, 16):
        ada = AdaptiveAugment(length=1000, update_every=ada_interval(GanConfig(batch=batch)))
        seen = [ada.tune(torch.ones(batch, 1)) for _ in range(8)]
        assert seen == [0.0] * 7 + [pytest.approx(8 * batch / 1000)]  # one update, by the 8 steps' images
    assert ada_interval(GanConfig(ada_every=256)) == 256


def test_tune_ignores_the_graph_of_real_pred():
    ada = AdaptiveAugment(update_every=2)
    real_pred = torch.ones(2, 1, requires_grad=True) * 3
    ada.tune(real_pred)
    assert ada.p > 0 and not ada.sign_sum.requires_grad


def test_state_dict_round_trip_resumes_mid_window():
    uninterrupted = AdaptiveAugment(length=100, update_every=8)
    resumed = AdaptiveAugment(length=100, update_every=8)
    for ada in (uninterrupted, resumed):
        ada.tune(torch.ones(8, 1))
        ada.tune(torch.tensor([[1.0], [-1.0], [1.0]]))  # a partial window
    state = resumed.state_dict()
    assert all(isinstance(value, (int, float)) for value in state.values())  # plain data

    restored = AdaptiveAugment(length=100, update_every=8)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    last_batch = torch.tensor([[1.0], [-1.0], [-1.0], [-1.0], [1.0]])
    assert restored.tune(last_batch) == uninterrupted.tune(last_batch)
    assert restored.r_t_stat == uninterrupted.r_t_stat


def test_bilinear_sampling_matches_grid_sample_zero_padding():
    picture = torch.randn(2, 3, 5, 7, generator=seeded(0), dtype=torch.float64)
    x = torch.rand(2, 40, generator=seeded(1), dtype=torch.float64) * 11 - 2  # some points outside
    y = torch.rand(2, 40, generator=seeded(2), dtype=torch.float64) * 9 - 2
    ours = _sample_bilinear(picture, x, y)
    # grid_sample's [-1, 1] units with align_corners=False: index = ((unit + 1) * size - 1) / 2.
    grid = torch.stack([(2 * x + 1) / 7 - 1, (2 * y + 1) / 5 - 1], dim=-1).unsqueeze(1)
    reference = F.grid_sample(picture, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert_near(ours, reference.squeeze(2), atol=1e-12)


def test_at_least_one_rotation_happens_with_probability_p():
    """ADA: each of the two rotations has 1 - sqrt(1 - p). Catches p for each (0.75 at p 0.5)."""
    m = sample_geometric(20000, 32, 32, 0.5, kinds=("rotate",), generator=torch.Generator().manual_seed(0))
    rotated = (m - torch.eye(3, dtype=m.dtype)).abs().amax((1, 2)) > 1e-9
    assert abs(rotated.double().mean().item() - 0.5) < 0.02
