"""Flags of the KMDN trainers, kept free of torch so that --help and a mistyped flag
answer at once (importing torch and torchvision takes seconds)."""
from tgn.cli import add_model_args, add_output_args, add_runtime_args, add_split_args, add_training_args, make_parser

OFFICIAL_IMAGE_SIZE = 224  # what the official KMDN models were trained at


def group_parser(doc, group):
    """UModel.py's (group 'head') and RModel.py's (group 'tail') flags."""
    parser = make_parser(doc)
    add_split_args(parser)
    add_model_args(parser)
    add_training_args(parser, epochs=100, batch_size=32)
    add_runtime_args(parser)
    add_output_args(parser, "runs/kmdn", f"folder of the KMDN runs: this one goes into OUT/{group}")
    parser.set_defaults(group=group)
    return parser
