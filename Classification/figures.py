"""Figures of a report (PNG through matplotlib's Agg canvas; no pyplot, no display needed).

- confusion matrix, row-normalised, class names on both axes;
- the long-tail chart, laid out as the paper's (figures/dior-longtail-result.png): classes
  ranked by real training count, head bars orange, tail bars green, generated images
  stacked in light green. The paper's lines trace the sample counts, each labelled with an
  overall accuracy; ours plot each report's per-class accuracy on a second axis, labelled
  with its OA (baseline vs augmented), which shows where the tail gains.
"""
import functools
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tgn.errors import UserError
from tgn.io import atomic_write_bytes
from tgn.metrics import format_percent
from tgn.plot_text import text_as_written
from tgn.split import rank_classes

HEAD_COLOUR, TAIL_COLOUR, GENERATED_COLOUR = "orange", "green", "#a8d890"
LINE_COLOURS = ("blue", "black", "red", "purple", "brown")


def _names_as_written(plot):
    """Class and method names drawn as written (tgn/plot_text.py)."""

    @functools.wraps(plot)
    def wrapper(report_or_reports, path):
        reports = report_or_reports if isinstance(report_or_reports, list) else [report_or_reports]
        names = [text for report in reports for text in (report["method"], *(row["name"] for row in report["classes"]))]
        with text_as_written(names):
            return plot(report_or_reports, path)

    return wrapper


def _save(figure, path):
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _percent(value):
    shown = format_percent(value)
    return shown if shown == "n/a" else f"{shown}%"


@_names_as_written
def plot_confusion(report, path):
    cm = np.asarray(report["confusion_matrix"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)  # absent class: blank row
    names = [row["name"] for row in report["classes"]]
    side = 3 + 0.45 * len(names)
    figure = Figure(figsize=(side + 1, side))
    axes = figure.subplots()
    image = axes.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{report['method']}: OA {_percent(report['overall_accuracy'])}")
    if len(names) <= 30:
        for (i, j), value in np.ndenumerate(normalised):
            if not np.isnan(value) and cm[i, j] > 0:
                axes.text(j, i, format_percent(value, places=0), ha="center", va="center", fontsize=6,
                          color="white" if value > 0.5 else "black")
    return _save(figure, path)


@_names_as_written
def plot_long_tail(reports, path):
    """Bars from the last report (the augmented one); one accuracy line per report."""
    last = reports[-1]
    ids = [row["id"] for row in last["classes"]]
    for report in reports[:-1]:
        if [row["id"] for row in report["classes"]] != ids:
            raise UserError(f"report {report['method']!r} is on other classes than {last['method']!r}")
    by_id = {row["id"]: row for row in last["classes"]}
    order = rank_classes({cid: by_id[cid]["train_count"] for cid in ids})
    x = np.arange(len(order))
    real = np.array([by_id[cid]["train_count"] for cid in order])
    generated = np.array([by_id[cid]["generated_count"] or 0 for cid in order])
    colours = [HEAD_COLOUR if by_id[cid]["group"] == "head" else TAIL_COLOUR for cid in order]

    figure = Figure(figsize=(4 + 0.5 * len(order), 5))
    axes = figure.subplots()
    axes.bar(x, real, color=colours)
    stacked = generated > 0
    if stacked.any():
        axes.bar(x[stacked], generated[stacked], bottom=real[stacked], color=GENERATED_COLOUR, edgecolor="black",
                 linestyle="--", linewidth=0.8)
    axes.set_xticks(x, [by_id[cid]["name"] for cid in order], rotation=45, ha="right", fontsize=8)
    axes.set_xlabel("class (ranked by real training count)")
    axes.set_ylabel("training images")
    handles = [Patch(color=HEAD_COLOUR, label="head classes"), Patch(color=TAIL_COLOUR, label="tail classes")]
    if stacked.any():
        handles.append(Patch(facecolor=GENERATED_COLOUR, edgecolor="black", linestyle="--", label="generated images"))

    accuracy_axes = axes.twinx()
    accuracy_axes.set_ylim(0, 105)
    accuracy_axes.set_ylabel("per-class test accuracy (%)")
    for report, colour in zip(reports, LINE_COLOURS):
        rows = {row["id"]: row for row in report["classes"]}
        values = [np.nan if rows[cid]["accuracy"] is None else 100 * rows[cid]["accuracy"] for cid in order]
        accuracy_axes.plot(x, values, color=colour, marker="o", markersize=3)
        handles.append(Line2D([], [], color=colour, marker="o", markersize=3,
                              label=f"{report['method']}: OA {_percent(report['overall_accuracy'])}"))
    accuracy_axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1), fontsize=8)
    return _save(figure, path)
