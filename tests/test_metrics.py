"""tgn.metrics on hand-made confusion matrices, incl. a class never predicted and classes absent from test."""
import math
from fractions import Fraction

import numpy as np
import pytest

from tgn.metrics import confusion_matrix, format_percent, per_class_accuracy, per_class_f1, summarize

# Rows: true class, columns: predicted class.
#   class 2 is present in test (3 images) but never predicted;
#   class 3 is absent from test and never predicted;
#   class 4 is absent from test but predicted once (a class-0 image).
CM = np.array([
    [3, 1, 0, 0, 1],
    [1, 2, 0, 0, 0],
    [2, 1, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
])


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    targets = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    predictions = [0, 0, 0, 1, 4, 0, 1, 1, 0, 0, 1]
    assert np.array_equal(confusion_matrix(targets, predictions, 5), CM)
    assert confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 2)


def test_per_class_accuracy_is_nan_for_a_class_absent_from_test():
    accuracy = per_class_accuracy(CM)
    assert accuracy[:3] == pytest.approx([3 / 5, 2 / 3, 0.0])
    assert math.isnan(accuracy[3]) and math.isnan(accuracy[4])


def test_per_class_f1_by_hand():
    f1 = per_class_f1(CM)
    # class 0: TP 3, FP 3 (1 + 2 from rows 1, 2), FN 2 -> 6 / 11
    # class 1: TP 2, FP 2, FN 1 -> 4 / 7;  class 2: never predicted -> 0
    # class 3: neither present nor predicted -> NaN; class 4: only a false positive -> 0
    assert f1[[0, 1, 2, 4]] == pytest.approx([6 / 11, 4 / 7, 0.0, 0.0])
    assert math.isnan(f1[3])


def test_summary_means_skip_undefined_classes():
    summary = summarize(CM, head=[0, 3], tail=[3, 4])
    assert summary["num_samples"] == 11
    assert summary["overall_accuracy"] == pytest.approx(5 / 11)
    assert summary["mean_class_accuracy"] == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert summary["macro_f1"] == pytest.approx((6 / 11 + 4 / 7 + 0 + 0) / 4)
    assert summary["head_accuracy"] == pytest.approx(3 / 5)  # class 3 absent: not counted as 0
    assert math.isnan(summary["tail_accuracy"])  # no tail class in test: n/a, not 0


def test_empty_group_and_empty_test_set_are_nan():
    assert math.isnan(summarize(CM, head=[0, 1, 2, 3, 4], tail=[])["tail_accuracy"])
    empty = summarize(np.zeros((3, 3), dtype=np.int64), head=[0], tail=[1, 2])
    assert all(math.isnan(empty[key]) for key in
               ("overall_accuracy", "mean_class_accuracy", "macro_f1", "head_accuracy", "tail_accuracy"))


def test_perfect_predictions():
    summary = summarize(np.diag([4, 1, 2]), head=[0], tail=[1, 2])
    for key in ("overall_accuracy", "mean_class_accuracy", "macro_f1", "head_accuracy", "tail_accuracy"):
        assert summary[key] == pytest.approx(1.0), key


def test_percentages_round_halves_up_as_a_table_made_from_the_fractions_would():
    for n in range(1, 201):  # test sets of up to 200 images: every accuracy k/n, 29/32 among them
        for k in range(n + 1):
            hundredths = math.floor(Fraction(100 * 100 * k, n) + Fraction(1, 2))
            assert format_percent(k / n) == f"{hundredths // 100}.{hundredths % 100:02d}", (k, n)


def test_a_class_outside_the_matrix_is_refused_not_counted_in_another_cell():
    with pytest.raises(ValueError, match="predictions outside 0..2"):
        confusion_matrix([1], [5], 3)  # row 1, column 5: the flat index of cell (2, 2)
    with pytest.raises(ValueError, match="targets outside 0..2"):
        confusion_matrix([-1], [1], 3)
    assert confusion_matrix([], [], 3).sum() == 0


def test_format_percent():
    assert format_percent(0.8656) == "86.56"
    assert format_percent(-math.inf) == "n/a"  # the best accuracy of a run that never had one
    assert (format_percent(1 / 8, places=0), format_percent(0.994, places=0)) == ("13", "99")  # the figures' cells
    assert format_percent(float("nan")) == "n/a"
    assert format_percent(None) == "n/a"
    assert format_percent(0.0) == "0.00"
    assert format_percent(-0.00001) == "0.00"  # a difference that rounds to none has no sign


def test_a_class_id_equal_to_the_class_count_is_refused():
    """Label 3 of 3 classes is refused, not counted in a neighbouring cell."""
    from tgn.metrics import confusion_matrix

    with pytest.raises(ValueError, match="predictions outside 0..2"):
        confusion_matrix([0], [3], 3)
    with pytest.raises(ValueError, match="targets outside 0..2"):
        confusion_matrix([3], [0], 3)


def test_the_csv_fractions_round_to_the_markdown_percents():
    """A table made from the CSV (rounding its fraction half up) shows what the Markdown
    shows: with 6 places 50/101 was 0.495050, which reads 49.51 against the report's 49.50."""
    from tgn.metrics import csv_fraction, format_percent

    assert csv_fraction(None) == csv_fraction(math.nan) == csv_fraction(-math.inf) == "n/a"
    assert format_percent(50 / 101) == "49.50"
    assert format_percent(float(csv_fraction(951 / 1001))) == "95.00"  # 0.9500500 with 7 places: 95.01
    for total in range(1, 400):
        for right in range(total + 1):
            assert format_percent(float(csv_fraction(right / total))) == format_percent(right / total), (right, total)


def test_an_empty_head_group_is_nan_not_zero():
    assert math.isnan(summarize(np.eye(3, dtype=int), head=[], tail=[0, 1, 2])["head_accuracy"])


def test_a_markdown_cell_keeps_one_line_and_its_escapes():
    from tgn.metrics import markdown_cell

    assert markdown_cell("a\r\nb\tc  d") == "a b c d"
    assert markdown_cell("a|b") == "a\\|b"
    assert markdown_cell("a\\|b") == "a\\\\\\|b"  # its own backslash escaped too: still one column


def test_decimals_keep_their_sign_unless_they_round_to_zero():
    from tgn.metrics import format_decimal

    assert format_decimal(-1.234, 2) == "-1.23" and format_decimal(-0.0004, 2) == "0.00"
    assert format_decimal(2.345, 2) == "2.35"  # half up
