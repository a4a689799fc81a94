"""User-facing errors: one line naming the file or flag, exit status 2, no traceback.
Warnings are one line too."""
import functools
import sys
import warnings


class UserError(Exception):
    """A problem with the user's input (path, data, checkpoint, flag)."""


def _one_line(exc):
    text = str(exc)
    # A UserError raised inside a DataLoader worker comes back re-wrapped with the
    # worker's traceback in its message; the original message is the last line.
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def one_line_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for the scripts: the message, not the source line that warned."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"warning{kind}: {message}\n"


def cli_main(main):
    """Decorate a script's main(argv) so user errors print one line and exit 2, and
    warnings print one line."""

    @functools.wraps(main)
    def wrapper(argv=None):
        warnings.formatwarning = one_line_warning
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
