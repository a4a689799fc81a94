"""The evaluation report of generated folders: Markdown, CSV, JSON and a PNG sample sheet.

JSON and CSV hold fractions (null / "n/a" where a metric is undefined or skipped),
Markdown percents. One row per tail class and an overall row per folder; the Markdown
starts with the table comparing the folders (labelled by their r).
"""
import csv
import io

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tgn.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from tgn.metrics import csv_fraction, format_decimal, format_percent, markdown_cell
from tgn.plot_text import text_as_written

EVALUATION_FORMAT = "tgn-cdtg-evaluation/1"
METRICS = (  # (key, Markdown title, kind)
    ("fid", "FID", "distance"),
    ("kid", "KID x1000", "kid"),
    ("lpips_generated", "LPIPS gen", "lpips"),
    ("lpips_real", "LPIPS real", "lpips"),
    ("clip_accuracy_generated", "CLIP gen %", "accuracy"),
    ("clip_accuracy_real", "CLIP real %", "accuracy"),
    ("teacher_accuracy_generated", "M_T gen %", "accuracy"),
    ("teacher_accuracy_real", "M_T real %", "accuracy"),
)
CSV_COLUMNS = ("folder", "path", "id", "name", "real_images", "generated_images", *(key for key, _, _ in METRICS))
THUMBNAIL = 64  # pixels of one image on the sample sheet
SHEET_IMAGES = 6  # images per class and set on the sample sheet
# FID from fewer images than this per set is mostly a function of the count (two sets from
# one distribution give FID ~330 at 30 images, ~60 at 1000): such cells are marked.
SMALL_FID_SET = 100
SMALL_FID_NOTE = (f"FID marked * comes from fewer than {SMALL_FID_SET} images in a set: it reflects the image "
                  "count more than the images; KID, unbiased, compares such classes.")


def build_evaluation(results, *, extractor, lpips, clip, teacher, settings, notes):
    return {"format": EVALUATION_FORMAT, "feature_extractor": extractor, "lpips": lpips, "clip": clip,
            "teacher": teacher, "settings": settings, "notes": notes, "folders": results}


def _markdown_cell(value, kind):
    if value is None:
        return "n/a"
    if kind == "accuracy":
        return format_percent(value)
    if kind == "kid":
        return format_decimal(1000 * value, 2)
    return format_decimal(value, 2 if kind == "distance" else 4)


def _table(first_title, rows, first_cells):
    lines = [f"| {first_title} | real | generated | " + " | ".join(title for _, title, _ in METRICS) + " |",
             "|---|---:|---:|" + "---:|" * len(METRICS)]
    for first, row in zip(first_cells, rows):
        cells = [_markdown_cell(row[key], kind) for key, _, kind in METRICS]
        if row["fid"] is not None and _fid_images(row) < SMALL_FID_SET:
            cells[0] += " *"
        lines.append(f"| {markdown_cell(first)} | {row['real_images']} | {row['generated_images']} | "
                     + " | ".join(cells) + " |")
    return lines


def _fid_images(row):
    return row.get("fid_images", min(row["real_images"], row["generated_images"]))


def evaluation_markdown(evaluation):
    folders = evaluation["folders"]
    lines = ["## Generated tail images", "", f"FID features: {evaluation['feature_extractor'] or 'skipped'}; "
             f"LPIPS: {evaluation['lpips'] or 'skipped'}; CLIP: {evaluation['clip'] or 'skipped'}; "
             f"M_T: {evaluation['teacher'] or 'skipped'}.", ""]
    lines += _table("folder", [f["overall"] for f in folders], [f["label"] for f in folders])
    for folder in folders:
        lines += ["", f"### {folder['label']}", "", f"{folder['path']}", ""]
        lines += _table("class", folder["classes"], [f"{row['id']} {row['name']}" for row in folder["classes"]])
    marked = any(row["fid"] is not None and _fid_images(row) < SMALL_FID_SET
                 for folder in folders for row in [folder["overall"], *folder["classes"]])
    lines += ["", *(f"- {note}" for note in [*evaluation["notes"], *([SMALL_FID_NOTE] if marked else [])])]
    return "\n".join(lines) + "\n"


def evaluation_csv(evaluation):
    """One row per folder and class, then the folder's overall row (id = all)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for folder in evaluation["folders"]:
        for row in [*folder["classes"], folder["overall"]]:
            writer.writerow([folder["label"], folder["path"], row["id"], row["name"], row["real_images"],
                             row["generated_images"],
                             *(csv_fraction(row[key]) for key, _, _ in METRICS)])
    return buffer.getvalue()


def _thumbnails(images, count):
    """[count, T, T, 3] uint8, blank where the set has fewer images."""
    tiles = np.full((count, THUMBNAIL, THUMBNAIL, 3), 255, dtype=np.uint8)
    if images is not None and len(images):
        small = F.interpolate(images[:count].float(), size=(THUMBNAIL, THUMBNAIL), mode="bilinear",
                              antialias=True, align_corners=False)
        tiles[:len(small)] = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return tiles


def plot_sample_sheet(sheets, class_ids, class_names, path, per_set=SHEET_IMAGES, gap=12):
    """Rows: tail classes; column groups: a few real images, then each generated folder's."""
    groups = list(sheets)
    step = THUMBNAIL + 2  # a 2-pixel white line between images
    group_width = per_set * step + gap
    mosaic = np.full((len(class_ids) * step, len(groups) * group_width - gap, 3), 255, dtype=np.uint8)
    for row, cid in enumerate(class_ids):
        for column, group in enumerate(groups):
            for k, tile in enumerate(_thumbnails(sheets[group].get(cid), per_set)):
                left = column * group_width + k * step
                mosaic[row * step:row * step + THUMBNAIL, left:left + THUMBNAIL] = tile
    with text_as_written([*groups, *class_names]):
        height, width = mosaic.shape[:2]
        figure = Figure(figsize=(width / 100, height / 100), dpi=100)
        axes = figure.add_axes([0, 0, 1, 1])  # one image pixel per figure pixel; labels fit by bbox_inches="tight"
        axes.imshow(mosaic, interpolation="nearest")
        axes.set_yticks([row * step + THUMBNAIL / 2 for row in range(len(class_ids))],
                        [f"{cid} {name}" for cid, name in zip(class_ids, class_names)], fontsize=9)
        axes.xaxis.tick_top()
        axes.set_xticks([column * group_width + per_set * step / 2 for column in range(len(groups))], groups,
                        fontsize=9)
        axes.tick_params(length=0)
        for spine in axes.spines.values():
            spine.set_visible(False)
        FigureCanvasAgg(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())
        return path


def write_evaluation(evaluation, out_dir):
    """out_dir/evaluation.{md,csv,json}."""
    atomic_write_text(out_dir / "evaluation.md", evaluation_markdown(evaluation))
    atomic_write_csv(out_dir / "evaluation.csv", evaluation_csv(evaluation))
    atomic_write_json(out_dir / "evaluation.json", evaluation)


def metric_notes(args, evaluator):
    notes = [
        "FID uses torchvision's Inception-v3, not the TF-Inception of the original FID code: the numbers compare "
        "only with FIDs from the same extractor (named above), never with published ones.",
        "FID from fewer than 2048 images per set is biased upward and depends on the image count: compare rows "
        f"at equal counts (--max-per-class {args.max_per_class}).",
        "KID (x1000 in this table; raw in the JSON and CSV) is the unbiased squared MMD of the same features "
        "with a cubic polynomial kernel: it does not depend on the count, so it compares small tail classes and "
        "sets of different sizes; values near 0, even slightly negative, mean no detectable difference. Copies "
        "of the real images are not independent draws: they score clearly below 0, the more so the fewer images.",
        "The overall FID and KID pool, of every class both sets hold, as many real as generated images (the smaller "
        "count, a seeded subset), so both pools have the same class proportions.",
        "Generated images are read from their JPEG files (generation.py --quality), real ones from the "
        "dataset's own files: FID and LPIPS include that compression difference.",
        f"LPIPS: mean over at most {args.pairs} random pairs of distinct images within a class; overall: the "
        "mean over classes. LPIPS real is the reference diversity.",
        "CLIP: zero-shot over the prompts of all tail classes; M_T: argmax over the tail classes. "
        "Accuracies on the real (training) images are the reference.",
    ]
    return notes if evaluator.inception is not None else notes[4:]
