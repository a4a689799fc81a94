"""Names of the files one stage writes for the next, and the reader of generation.json: the
stages share nothing else, and the classifier reads CDTG's files as plain data, without
importing the CDTG stage."""
from pathlib import Path

from tgn.errors import UserError
from tgn.io import read_json

TAIL_MANIFEST = "tail_classes.json"  # CDTG/dataset_split.py: generator label -> class id, name, prompt
GENERATED_ANNOTATION = "anno.txt"  # CDTG/generation.py: the images it wrote, what train.py --extra reads
GENERATION_SETTINGS = "generation.json"  # CDTG/generation.py: the checkpoint and settings behind them
# Present while generation.py adds images (anno.txt is rewritten after each class):
# --extra refuses a folder holding it, stopped or still running, rather than train on part of it.
GENERATION_UNFINISHED = "generation.unfinished"


def read_generation_settings(folder):
    """The settings CDTG/generation.py recorded in `folder`, {} for a folder of images made
    otherwise. A damaged file is refused: skipping it would skip the checks it serves."""
    path = Path(folder) / GENERATION_SETTINGS
    if not path.is_file():
        return {}
    settings = read_json(path, "generation settings")
    if not isinstance(settings, dict):
        raise UserError(f"generation settings {path} hold no settings (not a JSON object)")
    return settings
