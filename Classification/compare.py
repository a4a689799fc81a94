"""Side-by-side table of several classifier reports: head acc, tail acc, OA, macro-F1.

    python Classification/compare.py runs/dior/cls-baseline/report-best runs/dior/cls-resample/report-best \\
        runs/dior/cls-bsoftmax/report-best runs/dior/cls/report-best --out runs/dior/comparison

Each REPORT is a report.json or the folder holding it (report-best/ of train.py, or a
test.py --out folder), optionally prefixed with a row name: "baseline=runs/.../report.json".
Without a prefix the row is named after the report's method. Rows keep the given order.
Prints the Markdown table and writes OUT/comparison.md and OUT/comparison.csv (replacing
an earlier table only with --overwrite).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from Classification.report import comparison, comparison_csv, comparison_markdown, read_report  # noqa: E402
from tgn.cli import make_parser, output_folder  # noqa: E402
from tgn.errors import cli_main  # noqa: E402
from tgn.io import atomic_write_csv, atomic_write_text, remove_temp_files  # noqa: E402
from tgn.run_folder import check_run_dir  # noqa: E402

TABLE_MD, TABLE_CSV = "comparison.md", "comparison.csv"


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("reports", nargs="+", metavar="REPORT", help="[NAME=]report.json or its folder")
    parser.add_argument("--out", type=output_folder, default=Path("runs/comparison"), help="folder for the tables")
    parser.add_argument("--overwrite", action="store_true", help="replace a table already in --out")
    return parser


def parse_report_arg(text):
    """'NAME=PATH' -> (NAME, PATH); a plain PATH -> (None, PATH). Paths may contain '='."""
    name, sep, path = text.partition("=")
    if sep and name and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def per_class(report, key):
    return tuple(row.get(key) for row in report["classes"])


def comparison_notes(reports):
    """What makes the rows less comparable (the classes and dataset are the same: checked
    by `comparison`): other head/tail groups, other test images, other real training images
    (generated ones differ by design)."""
    notes = []
    if len({(tuple(sorted(report["head"])), tuple(sorted(report["tail"]))) for report in reports}) > 1:
        notes.append("the reports use different head/tail groups.")
    counts = sorted({report["num_test_images"] for report in reports})
    if len(counts) > 1:
        notes.append(f"the reports count different numbers of test images ({', '.join(map(str, counts))}).")
    elif len({per_class(report, "test_count") for report in reports}) > 1:
        notes.append("the reports count different test images per class.")
    if len({per_class(report, "train_count") for report in reports}) > 1:
        notes.append("the models trained on different real images per class (train_count: other data, or images "
                     "--skip-bad-images left out).")
    return notes


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_run_dir(args.out, overwrite=args.overwrite, results=(TABLE_MD, TABLE_CSV), resumable=False, args=args)
    names, reports, sources = [], [], []
    for text in args.reports:
        name, path = parse_report_arg(text)
        report = read_report(path)
        names.append(name or report["method"])
        reports.append(report)
        sources.append(f"{name}={path}" if name else str(path))
    rows = comparison(reports, names, sources)
    notes = comparison_notes(reports)
    note = "Note: " + " Also, ".join(notes) if notes else None
    table = comparison_markdown(rows, note)
    remove_temp_files(args.out)  # what a comparison killed mid-write left
    atomic_write_text(args.out / TABLE_MD, table)
    atomic_write_csv(args.out / TABLE_CSV, comparison_csv(rows))
    print(table)
    print(f"wrote {args.out / TABLE_MD} and {args.out / TABLE_CSV}")
    return rows


if __name__ == "__main__":
    main()
