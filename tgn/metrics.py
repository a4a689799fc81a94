"""Classification metrics, all computed from one confusion matrix.

Conventions (they matter for long-tailed test sets):
- a class absent from the test set has accuracy NaN (not 0) and is left out of means;
- a class that is never predicted but present in test has precision 0, so F1 = 0;
- F1, and so macro-F1, follow scikit-learn: a class absent from the test set but predicted
  for some images has F1 0 and counts in macro-F1; one neither present nor predicted is NaN;
- a group (head or tail) with no class present in test has mean accuracy NaN ("n/a").
"""
import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np


def confusion_matrix(targets, predictions, num_classes):
    """cm[i, j] = number of samples of true class i predicted as class j."""
    targets = np.asarray(targets, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if targets.shape != predictions.shape:
        raise ValueError("targets and predictions differ in length")
    for name, values in (("targets", targets), ("predictions", predictions)):
        if values.size and not 0 <= values.min() <= values.max() < num_classes:  # it would land in another cell
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    flat = targets * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_divide(numerator, denominator):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def per_class_accuracy(cm):
    """Recall of each class; NaN for a class absent from the test set."""
    return _safe_divide(np.diag(cm), cm.sum(axis=1))


def per_class_f1(cm):
    """F1 = 2TP / (2TP + FP + FN); NaN for a class neither present nor predicted."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return _safe_divide(2 * tp, 2 * tp + fp + fn)


def summarize(cm, head=None, tail=None):
    """Overall, per-class and head/tail metrics of a confusion matrix.

    `head` and `tail` are lists of class indices (rows of `cm`). Means skip NaN entries,
    so absent classes never count as 0.
    """
    cm = np.asarray(cm)
    total = cm.sum()
    accuracy = per_class_accuracy(cm)
    f1 = per_class_f1(cm)
    summary = {
        "num_samples": int(total),
        "overall_accuracy": float(np.trace(cm) / total) if total else math.nan,
        "mean_class_accuracy": _nanmean(accuracy),
        "macro_f1": _nanmean(f1),
        "per_class_accuracy": accuracy.tolist(),
        "per_class_f1": f1.tolist(),
    }
    if head is not None:
        summary["head_accuracy"] = _nanmean(accuracy[list(head)]) if len(head) else math.nan
    if tail is not None:
        summary["tail_accuracy"] = _nanmean(accuracy[list(tail)]) if len(tail) else math.nan
    return summary


def format_percent(value, places=2):
    """'86.56' for 0.8656 ('87' with places=0), 'n/a' for NaN, infinities or None. Halves
    round up (29/32: 90.63), as a table made by hand or in a spreadsheet from the CSV's
    fractions would, not to even as Python's format does."""
    return format_decimal(None if value is None else 100.0 * value, places)


def format_decimal(value, places):
    """`value` to `places` decimals with halves rounded away from zero, 'n/a' for NaN,
    infinities or None, and no '-0.00' for a negative that rounds to zero (the FID of copies
    comes out as -4e-5). The 9 places first drop the float's last-digit noise."""
    if value is None or not math.isfinite(value):  # -inf: the best accuracy of a run that never had one
        return "n/a"
    rounded = Decimal(f"{value:.9f}").quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return str(abs(rounded) if rounded == 0 else rounded)


def csv_fraction(value):
    """A number as the CSVs hold it ('n/a' for None, NaN or infinities, as format_percent):
    10 places, so that rounding it again gives what the Markdown shows (6 would not: 50/101
    is 0.495050, which reads 49.51, not 49.50; 10 tell apart every k/n of n below 10^6 from
    the halves between two cells)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.10f}"


def markdown_cell(text):
    """`text` as one cell of a Markdown table: a '|' in a class or method name would start a
    new column, a line break a new row."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")
