"""Progress bars (tqdm, on stderr) whose end leaves the next line its own, on a terminal
and in a log file alike."""
import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, transient=False, **kwargs):
    """A tqdm bar as wide as the terminal. A `transient` one (a check, an epoch's steps) is
    cleared from a terminal when it ends; written to a log file (stderr not a terminal) it
    ends its line instead: cleared there, it leaves its text without a line end, and the
    next line (a warning, an error, the epoch's summary) would be appended to it."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, leave=not transient or not sys.stderr.isatty(), **kwargs)
