"""Names of the files one stage writes for the next: the stages share nothing else, and the
classifier reads CDTG's files as plain data, without importing the CDTG stage."""

TAIL_MANIFEST = "tail_classes.json"  # CDTG/dataset_split.py: generator label -> class id, name, prompt
GENERATED_ANNOTATION = "anno.txt"  # CDTG/generation.py: the images it wrote, what train.py --extra reads
GENERATION_SETTINGS = "generation.json"  # CDTG/generation.py: the checkpoint and settings behind them
# Present while generation.py adds images (anno.txt is rewritten after each class):
# --extra refuses a folder holding it, stopped or still running, rather than train on part of it.
GENERATION_UNFINISHED = "generation.unfinished"
