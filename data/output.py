"""The folder a preparer writes a dataset into: built aside, inside it, and swapped in whole
once complete, so that a failure or a kill never leaves half a dataset, nor loses the
previous one (--overwrite)."""
import shutil
from contextlib import contextmanager
from pathlib import Path

from tgn.cli import output_folder
from tgn.errors import UserError
from tgn.io import absolute_path, make_folder, same_path
from tgn.runlock import LOCK_NAME, claim_folder, refuse_folder_in_use

# What --overwrite replaces in the output folder; anything else there is left alone.
LAYOUT_ITEMS = ("train", "test", "anno", "classes.json")
# building_dataset's hidden folders inside the output: the dataset being built, and the one
# it replaces while it is moved into place.
STAGING, REPLACED = ".preparing", ".replaced"
# What file managers leave in a folder they showed: not "other files".
SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def add_output_arguments(parser, default=None):
    parser.add_argument("--out", type=output_folder, required=default is None, default=default,
                        help="dataset folder to write")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace train/, test/, anno/ and classes.json in a non-empty --out",
    )


def check_output(out, overwrite, inputs=()):
    """Refuse an --out that building_dataset would refuse, touching nothing: one a running
    preparer holds (tgn.runlock), a folder inside an input, a non-empty folder that is not
    a prepared dataset, one without --overwrite, one whose --overwrite would delete an input."""
    out = Path(out)  # a file at its place is refused as the flag is read (tgn.cli.output_folder)
    refuse_folder_in_use(out)
    for source in inputs:
        if any(same_path(place, source) for place in _places(out)):
            raise UserError(f"--out {out} is inside the input {Path(source).resolve()}; write the dataset elsewhere")
    if out.is_dir() and any(entry.name not in (STAGING, REPLACED, LOCK_NAME, *SYSTEM_FILES)
                            for entry in out.iterdir()):
        if not ((out / "classes.json").is_file() or (out / "anno").is_dir()):
            raise UserError(f"--out {out} holds other files and no prepared dataset (classes.json, anno/); "
                            "choose a new or empty folder")
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the dataset there")
        for source in inputs:
            if any(same_path(place, path) for place in _places(source) for path in _layout_paths(out)):
                raise UserError(f"--out {out}: --overwrite would delete the input {Path(source).resolve()}; write "
                                "elsewhere")
    return out


def _places(path):
    """A path and the folders above it, as spelled and where its links lead, compared with
    same_path (a file system that ignores case spells one folder several ways). Made
    absolute first: on Windows, Python 3.9 resolves a relative path not there yet to itself."""
    spelled = absolute_path(path)
    resolved = spelled.resolve()
    return {spelled, *spelled.parents, resolved, *resolved.parents}


def _layout_paths(out):
    """Where the layout's items lead (through symlinks): what removing them could reach."""
    return [(Path(out) / item).resolve() for item in LAYOUT_ITEMS]


@contextmanager
def building_dataset(out, overwrite, inputs=()):
    """Yield the folder to build a dataset in (hidden, inside `out`); once the block ends
    without error, the new dataset takes the place of any previous one there (--overwrite).
    Until then the previous dataset stays whole: a bad scene found an hour into cropping,
    or a killed run, costs nothing already prepared. A failure removes the partial build,
    and `out` (with the parents this run made for it) if nothing else is there."""
    out = check_output(out, overwrite, inputs)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # removed again after a failure
    staging, replaced = out / STAGING, out / REPLACED
    if staging.exists() and replaced.exists():  # stopped between the swap's renames: which is which is unclear
        raise UserError(f"--out {out}: an earlier run stopped while it moved its dataset into place; "
                        f"{half_swapped(out, staging, replaced)}")
    make_folder(out)
    lock_made = not (out / LOCK_NAME).exists()
    claim_folder(out)  # from here on this preparer alone writes there
    for leftover in (staging, replaced):  # of a run killed midway (building, or deleting the old dataset)
        if leftover.exists():
            try:
                shutil.rmtree(leftover)
            except OSError as exc:  # written into as it is removed: the run that left it is still going
                leave_as_found(out, created, lock_made)
                raise UserError(f"--out {out}: cannot remove {leftover.name}, left by an earlier run "
                                f"({exc.strerror or exc}); if that run still goes, wait for its end") from exc
    make_folder(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        leave_as_found(out, created, lock_made)
        raise
    swap_datasets(out, staging, replaced, lambda: leave_as_found(out, created, lock_made))


def leave_as_found(out, created, lock_made):
    """After a failure: no lock file that this run made, and none of the `created` folders
    (`out` and the parents this run made for it) where nothing else is there."""
    if lock_made:
        (out / LOCK_NAME).unlink(missing_ok=True)
    for folder in created:  # innermost first
        try:
            folder.rmdir()  # only if nothing else is there
        except OSError:
            break


def swap_datasets(out, staging, replaced, undo_folder):
    """Renames only between the two datasets (deleting a large one takes a while): the old
    items are moved aside, the new moved in, then the old deleted. A rename refused (on
    Windows: a file held open) undoes the renames before it, keeping the old dataset."""
    previous = [item for item in LAYOUT_ITEMS if (out / item).is_symlink() or (out / item).exists()]
    moved = []  # (from, to) in order
    try:
        replaced.mkdir()
        for item in previous:
            (out / item).rename(replaced / item)  # a symlink is moved, never followed
            moved.append((out / item, replaced / item))
        for item in LAYOUT_ITEMS:
            if (staging / item).exists():
                (staging / item).rename(out / item)
                moved.append((staging / item, out / item))
    except OSError as exc:
        why = f"--out {out}: cannot move the new dataset into place ({exc.strerror or exc})"
        try:
            for source, target in reversed(moved):
                target.rename(source)
            if replaced.exists():
                replaced.rmdir()  # before the build goes: a .preparing left alone, the next run clears
        except OSError:
            raise UserError(f"{why}, nor the previous one back; {half_swapped(out, staging, replaced)}") from exc
        shutil.rmtree(staging)
        undo_folder()
        kept = "; the previous one is kept" if previous else ""
        raise UserError(f"{why}{kept}: close what holds its files open and run again") from exc
    staging.rmdir()
    shutil.rmtree(replaced)


def half_swapped(out, staging, replaced):
    return (f"the previous dataset's items are in {replaced}, the new one's in {staging} or {out}: put back the "
            f"ones to keep, then delete {staging.name} and {replaced.name}")
