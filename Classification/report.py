"""The evaluation report of a classifier, as Markdown, CSV and JSON, and the comparison table.

Every number comes from tgn.metrics.summarize of one confusion matrix. JSON holds
fractions (null where undefined), CSV fractions ("n/a" where undefined), Markdown percents.
Head/tail are the groups of the real training counts; an empty group is n/a, never 0.
"""
import csv
import io
import math
from pathlib import Path

import numpy as np

from tgn.class_names import renamed_class
from tgn.errors import UserError
from tgn.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from tgn.metrics import csv_fraction, format_percent, markdown_cell, summarize

REPORT_FORMAT = "tgn-classification-report/1"
REPORT_JSON = "report.json"  # the machine-readable report; its folder stands for it on command lines
SUMMARY_ROWS = (  # (CSV id, label, summary key)
    ("all", "overall accuracy (OA)", "overall_accuracy"),
    ("mean", "mean per-class accuracy", "mean_class_accuracy"),
    ("head", "head-class mean accuracy", "head_accuracy"),
    ("tail", "tail-class mean accuracy", "tail_accuracy"),
    ("f1", "macro-F1", "macro_f1"),
)
CLASS_COLUMNS = ("id", "name", "group", "train_count", "generated_count", "test_count", "accuracy", "f1")
COMPARISON_COLUMNS = (("head acc", "head_accuracy"), ("tail acc", "tail_accuracy"), ("OA", "overall_accuracy"),
                      ("macro-F1", "macro_f1"))


def _number(value):
    """JSON-safe: NaN becomes None."""
    return None if value is None or math.isnan(value) else float(value)


def build_report(cm, *, method, source, dataset, class_ids, class_names, train_counts, generated_counts,
                 head, tail, grouping):
    """`head`/`tail` are class ids; `generated_counts` is None when unknown (official weights)."""
    index_of = {cid: index for index, cid in enumerate(class_ids)}
    cm = np.asarray(cm)
    summary = summarize(cm, head=[index_of[c] for c in head], tail=[index_of[c] for c in tail])
    classes = [
        {
            "id": cid,
            "name": class_names[index],
            "group": "head" if cid in head else "tail",
            "train_count": int(train_counts[index]),
            "generated_count": None if generated_counts is None else int(generated_counts[index]),
            "test_count": int(cm[index].sum()),
            "accuracy": _number(summary["per_class_accuracy"][index]),
            "f1": _number(summary["per_class_f1"][index]),
        }
        for index, cid in enumerate(class_ids)
    ]
    return {
        "format": REPORT_FORMAT,
        "method": method,
        "source": str(source),
        "dataset": dataset,
        "grouping": grouping,
        "num_test_images": summary["num_samples"],
        **{key: _number(summary[key]) for _, _, key in SUMMARY_ROWS},
        "head": list(head),
        "tail": list(tail),
        "classes": classes,
        "confusion_matrix": cm.tolist(),
    }


def _cell(value):
    return "n/a" if value is None else value


def report_markdown(report):
    groups = {}
    for group in ("mean", "head", "tail"):  # a mean is over the group's classes with test images
        rows = [row for row in report["classes"] if group == "mean" or row["group"] == group]
        tested, total = sum(1 for row in rows if row["test_count"]), len(rows)
        if group != "mean" or tested != total:  # the overall mean names its count where some have no test images
            groups[group] = f"{total}" if tested == total else f"{tested} of {total}"
    lines = [
        f"## {report['method']}",
        "",
        f"{report['source']} on {report['dataset']}: {report['num_test_images']} test images; "
        f"head/tail from {report['grouping']}.",
        "",
        "| metric | % |",
        "|---|---:|",
    ]
    for csv_id, label, key in SUMMARY_ROWS:
        suffix = f" ({groups[csv_id]} classes)" if csv_id in groups else ""
        lines.append(f"| {label}{suffix} | {format_percent(report[key])} |")
    lines += ["", "| id | name | group | train | generated | test | accuracy % | F1 % |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in report["classes"]:
        lines.append(f"| {row['id']} | {markdown_cell(row['name'])} | {row['group']} | {row['train_count']} | "
                     f"{_cell(row['generated_count'])} | {row['test_count']} | {format_percent(row['accuracy'])} | "
                     f"{format_percent(row['f1'])} |")
    return "\n".join(lines) + "\n"


def report_csv(report):
    """One row per class, then one row per summary metric (id = all, mean, head, tail, f1)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CLASS_COLUMNS)
    for row in report["classes"]:
        writer.writerow([row["id"], row["name"], row["group"], row["train_count"], _cell(row["generated_count"]),
                         row["test_count"], csv_fraction(row["accuracy"]), csv_fraction(row["f1"])])
    for csv_id, label, key in SUMMARY_ROWS:
        value = csv_fraction(report[key])
        writer.writerow([csv_id, label, "", "", "", "", *(("", value) if key == "macro_f1" else (value, ""))])
    return buffer.getvalue()


def write_report(report, folder):
    """folder/report.{md,csv,json}; returns the folder."""
    folder = Path(folder)
    atomic_write_text(folder / "report.md", report_markdown(report))
    atomic_write_csv(folder / "report.csv", report_csv(report))
    atomic_write_json(folder / REPORT_JSON, report)
    return folder


def read_report(path):
    """A report.json, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        if not (path / REPORT_JSON).is_file() and (path / "report-best" / REPORT_JSON).is_file():
            # A training run folder: its report (of best.pth) lies one folder down.
            raise UserError(f"{path} is a training run folder, which holds no report.json itself; pass "
                            f"{path / 'report-best'}, the report of its best.pth")
        path = path / REPORT_JSON
    report = read_json(path, "report")
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise UserError(f"{path} is not a report written by Classification/test.py or train.py")
    damaged = damage_in(report)
    if damaged:
        raise UserError(f"{path}: {damaged}, so the report is damaged; write it again with Classification/test.py")
    return report


def _is_metric(value):
    """A fraction as reports store it: a number, or null for n/a (not a bool, not a string)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def damage_in(report):
    """What a report read back lacks of what the comparison and the figures use, else None."""
    if not isinstance(report.get("method"), str):
        return "it has no method name"
    for _, key in COMPARISON_COLUMNS:
        if not _is_metric(report.get(key, "missing")):
            return f"its {key!r} is missing or not a number"
    for key in ("head", "tail"):
        ids = report.get(key)
        if not isinstance(ids, list) or not all(isinstance(cid, int) and not isinstance(cid, bool) for cid in ids):
            return f"its {key!r} class ids are missing"
    count = report.get("num_test_images")
    if not isinstance(count, int) or isinstance(count, bool):
        return "its 'num_test_images' is missing or not a number"
    classes = report.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(row, dict) for row in classes):
        return "it has no class rows"
    for row in classes:
        cid = row.get("id")
        if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(row.get("name"), str):
            return "a class row has no id or name"
        if not _is_metric(row.get("accuracy", "missing")):
            return f"class {row['id']}'s accuracy is missing or not a number"
    return None


def renamed_report_class(report, names):
    """The first (id, its name in `report`, its name in `names`: id -> name) that differ, else
    None: a dataset whose classes are numbered otherwise (DOTA's chip releases number its
    15 classes in two orders) keeps its ids and name, not its class names."""
    rows = [row for row in report["classes"] if row["id"] in names]
    position = renamed_class([row.get("name") for row in rows], [names[row["id"]] for row in rows],
                             [row["id"] for row in rows])
    if position is None:
        return None
    row = rows[position]
    return row["id"], row.get("name"), names[row["id"]]


def comparison(reports, labels=None, sources=None):
    """Rows (method, head acc, tail acc, OA, macro-F1) of reports on the same classes; a
    mismatch is named by the reports' `sources` (as given), else their labels."""
    labels = labels or [report["method"] for report in reports]
    sources = [f"'{source}'" for source in sources or labels]
    first = reports[0]
    for report, source in zip(reports[1:], sources[1:]):
        if report.get("dataset") != first.get("dataset"):
            raise UserError(f"reports {sources[0]} and {source} are on different datasets "
                            f"({first.get('dataset')}, {report.get('dataset')})")
        if [c["id"] for c in report["classes"]] != [c["id"] for c in first["classes"]]:
            raise UserError(f"reports {sources[0]} and {source} are on different classes")
        renamed = renamed_report_class(report, {c["id"]: c.get("name") for c in first["classes"]})
        if renamed:
            raise UserError(f"reports {sources[0]} and {source} name class {renamed[0]} "
                            f"'{renamed[2]}' and '{renamed[1]}': another dataset or class numbering")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # e.g. every run with --extra is 'TGN'
        raise UserError(f"two reports are named {repeated[0]!r}: name each row, NAME=REPORT "
                        "(e.g. tgn-r0.5=RUN/report-best)")
    return [{"method": label, **{key: report[key] for _, key in COMPARISON_COLUMNS}}
            for label, report in zip(labels, reports)]


def comparison_markdown(rows, note=None):
    lines = ["| method | " + " | ".join(f"{title} %" for title, _ in COMPARISON_COLUMNS) + " |",
             "|---|" + "---:|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        cells = [format_percent(row[key]) for _, key in COMPARISON_COLUMNS]
        lines.append(f"| {markdown_cell(row['method'])} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def comparison_csv(rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", *(key for _, key in COMPARISON_COLUMNS)])
    for row in rows:
        writer.writerow([row["method"], *(csv_fraction(row[key]) for _, key in COMPARISON_COLUMNS)])
    return buffer.getvalue()
