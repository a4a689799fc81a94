"""Write a small long-tailed remote-sensing-like dataset, offline, in a few seconds.

    python data/make_demo.py --out demo

Nine classes drawn as little aerial scenes (a car park, a ship on water, storage tanks, ...)
with random position, size, rotation, colour jitter and noise; 120 training images for the
largest class down to 8 for the smallest (15:1), and --test-per-class test images each.
Class ids are alphabetical, as in DIOR, so head and tail classes are interleaved. The same
--seed gives byte-identical files. The result is in the layout of tgn/data.py, ready for
the stage scripts (e.g. `python KMDN/dataset_split.py --data-root demo`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data.chips import Tally, make_class_dirs, report, write_dataset  # noqa: E402
from data.output import add_output_arguments, building_dataset  # noqa: E402
from tgn.data import SUBSETS, Entry  # noqa: E402
from tgn.cli import make_parser, positive_int, seed_value  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402

DATASET = "DEMO"
MAX_SIZE = 512
SUPERSAMPLE = 4  # shapes are drawn this much larger, then downsampled with antialiasing


# ---------------------------------------------------------------- drawing helpers

def jitter(rng, colour, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def rotate(points, angle, centre):
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = centre
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def rectangle(width, height):
    return [(-width / 2, -height / 2), (width / 2, -height / 2), (width / 2, height / 2), (-width / 2, height / 2)]


def place(rng, canvas, margin=0.3):
    """A random centre away from the border, a random scale and a random angle."""
    centre = tuple(rng.uniform(margin, 1 - margin, size=2) * canvas)
    return centre, rng.uniform(0.75, 1.2) * canvas, rng.uniform(0, 2 * math.pi)


def disc(draw, centre, radius, fill, outline=None, width=1):
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=outline, width=width)


# ---------------------------------------------------------------- one painter per class

def paint_airplane(draw, rng, canvas):
    centre, scale, angle = place(rng, canvas)
    body = jitter(rng, (240, 240, 240), 10)
    fuselage = rectangle(0.10 * scale, 0.62 * scale)
    wings = [(-0.36 * scale, 0.02 * scale), (0, -0.12 * scale), (0.36 * scale, 0.02 * scale), (0, 0.02 * scale)]
    tail = [(-0.14 * scale, 0.30 * scale), (0, 0.22 * scale), (0.14 * scale, 0.30 * scale), (0, 0.27 * scale)]
    for part in (fuselage, wings, tail):
        draw.polygon(rotate(part, angle, centre), fill=body)


def paint_baseballfield(draw, rng, canvas):
    centre, scale, angle = place(rng, canvas, 0.4)
    start = math.degrees(angle)
    x, y = centre
    radius = 0.45 * scale
    draw.pieslice([x - radius, y - radius, x + radius, y + radius], start, start + 90, fill=jitter(rng, (185, 130, 85)))
    diamond = rotate([(0, 0), (0.2 * scale, 0), (0.2 * scale, 0.2 * scale), (0, 0.2 * scale)], angle, centre)
    draw.polygon(diamond, outline=(245, 245, 245), width=max(1, int(0.02 * canvas)))


def paint_bridge(draw, rng, canvas):
    bank = jitter(rng, (70, 120, 60))
    draw.rectangle([0, 0, canvas, 0.2 * canvas], fill=bank)
    draw.rectangle([0, 0.8 * canvas, canvas, canvas], fill=bank)
    centre, scale, _ = place(rng, canvas, 0.45)
    angle = math.pi / 2 + rng.uniform(-0.5, 0.5)  # spans the river, roughly across
    deck = rotate(rectangle(1.6 * canvas, 0.14 * scale), angle, centre)
    draw.polygon(deck, fill=jitter(rng, (175, 175, 170)))
    draw.line(rotate([(-0.8 * canvas, 0), (0.8 * canvas, 0)], angle, centre), fill=(240, 220, 90),
              width=max(1, int(0.015 * canvas)))


def paint_harbor(draw, rng, canvas):
    shore = rng.uniform(0.25, 0.4) * canvas
    draw.rectangle([0, 0, canvas, shore], fill=jitter(rng, (150, 145, 135)))
    pier = jitter(rng, (200, 195, 185))
    count = int(rng.integers(3, 6))
    spacing = canvas / (count + 1)
    length = rng.uniform(0.3, 0.5) * canvas
    for number in range(1, count + 1):
        x = number * spacing + rng.uniform(-0.05, 0.05) * canvas
        draw.rectangle([x - 0.03 * canvas, shore, x + 0.03 * canvas, shore + length], fill=pier)


def paint_ship(draw, rng, canvas):
    centre, scale, angle = place(rng, canvas)
    length, beam = 0.62 * scale, 0.14 * scale
    hull = [(-beam / 2, length / 2), (-beam / 2, -length / 4), (0, -length / 2), (beam / 2, -length / 4),
            (beam / 2, length / 2)]
    draw.polygon(rotate(hull, angle, centre), fill=jitter(rng, (225, 225, 230), 10))
    draw.polygon(rotate(rectangle(beam * 0.6, length * 0.2), angle, centre), fill=jitter(rng, (120, 120, 130)))


def paint_storagetank(draw, rng, canvas):
    for _ in range(int(rng.integers(1, 3))):
        centre, scale, _ = place(rng, canvas, 0.32)
        radius = 0.2 * scale
        shadow = (centre[0] + 0.25 * radius, centre[1] + 0.25 * radius)
        disc(draw, shadow, radius, fill=(90, 80, 65))
        disc(draw, centre, radius, fill=jitter(rng, (238, 238, 232), 8), outline=(150, 150, 150),
             width=max(1, int(0.02 * canvas)))


def paint_tenniscourt(draw, rng, canvas):
    centre, scale, angle = place(rng, canvas, 0.4)
    line = max(1, int(0.02 * canvas))
    court = rectangle(0.36 * scale, 0.7 * scale)
    draw.polygon(rotate(court, angle, centre), fill=jitter(rng, (50, 140, 95)), outline=(245, 245, 245), width=line)
    draw.line(rotate([(-0.18 * scale, 0), (0.18 * scale, 0)], angle, centre), fill=(245, 245, 245), width=line)
    draw.line(rotate([(0, -0.2 * scale), (0, 0.2 * scale)], angle, centre), fill=(245, 245, 245), width=line)


def paint_vehicle(draw, rng, canvas):
    lane = (215, 215, 200)
    for x in (0.33, 0.66):
        draw.line([(x * canvas, 0), (x * canvas, canvas)], fill=lane, width=max(1, int(0.015 * canvas)))
    for _ in range(int(rng.integers(1, 4))):
        centre, scale, _ = place(rng, canvas, 0.2)
        angle = rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.2, 0.2)
        colour = tuple(int(c) for c in rng.integers(30, 256, size=3))
        draw.polygon(rotate(rectangle(0.14 * scale, 0.28 * scale), angle, centre), fill=colour)
        draw.polygon(rotate([(x, y - 0.05 * scale) for x, y in rectangle(0.11 * scale, 0.06 * scale)], angle, centre),
                     fill=(40, 45, 55))


def paint_windmill(draw, rng, canvas):
    centre, scale, angle = place(rng, canvas, 0.4)
    blade = jitter(rng, (245, 245, 245), 8)
    width = max(1, int(0.035 * canvas))
    shadow = (centre[0] + 0.25 * scale, centre[1] + 0.25 * scale)
    draw.line([centre, shadow], fill=(60, 60, 45), width=width)
    for number in range(3):
        tip = rotate([(0, -0.38 * scale)], angle + number * 2 * math.pi / 3, centre)[0]
        draw.line([centre, tip], fill=blade, width=width)
    disc(draw, centre, 0.04 * scale, fill=blade)


# name (words: they become CLIP prompts) -> (training images, background colour, painter); ids are
# the alphabetical order.
CLASSES = {
    "airplane": (40, (165, 165, 160), paint_airplane),
    "baseball field": (16, (75, 145, 65), paint_baseballfield),
    "bridge": (8, (45, 85, 120), paint_bridge),
    "harbor": (12, (35, 70, 125), paint_harbor),
    "ship": (90, (25, 55, 100), paint_ship),
    "storage tank": (60, (195, 180, 145), paint_storagetank),
    "tennis court": (24, (125, 100, 80), paint_tenniscourt),
    "vehicle": (120, (85, 85, 90), paint_vehicle),
    "windmill": (10, (150, 160, 95), paint_windmill),
}


def render(class_name, seed, subset, class_id, number, size):
    """One image, from its own random stream: (seed, subset, class, number) fixes every pixel."""
    _, background, painter = CLASSES[class_name]
    rng = np.random.default_rng([seed, SUBSETS.index(subset), class_id, number])
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), jitter(rng, background))
    painter(ImageDraw.Draw(image), rng, canvas)
    image = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.85, 1.15) + rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def parse_args(argv):
    parser = make_parser(__doc__)
    add_output_arguments(parser, default=Path("demo"))
    parser.add_argument("--size", type=positive_int, default=32, help=f"image side in pixels, 8 to {MAX_SIZE}")
    parser.add_argument("--test-per-class", type=positive_int, default=20, help="test images per class")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed; the same seed writes identical files")
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if not 8 <= args.size <= MAX_SIZE:  # the scenes are drawn for small chips; a huge side fills the memory
        raise UserError(f"--size must be from 8 to {MAX_SIZE} pixels, got {args.size}")
    if args.test_per_class < 1:
        raise UserError(f"--test-per-class must be at least 1, got {args.test_per_class}")
    class_names = dict(enumerate(CLASSES))
    tally = Tally()
    with building_dataset(args.out, args.overwrite) as folder:
        make_class_dirs(folder, class_names)
        for class_id, name in class_names.items():
            counts = {"train": CLASSES[name][0], "test": args.test_per_class}
            for subset in SUBSETS:
                for number in range(counts[subset]):
                    relpath = f"{class_id}/{name.replace(' ', '_')}_{number:04d}.jpg"
                    image = render(name, args.seed, subset, class_id, number, args.size)
                    image.save(folder / subset / relpath, quality=90)
                    tally.entries[subset].append(Entry(relpath, class_id))
        write_dataset(folder, DATASET, class_names, tally)
    report(DATASET, Path(args.out), class_names, tally)


if __name__ == "__main__":
    main()
