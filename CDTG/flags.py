"""Flags that CDTG's train.py and evaluate.py share, kept free of torch so that --help and a
mistyped flag answer at once."""


def add_clip_args(group, *, help):
    group.add_argument("--clip", default="ViT-B/32", help=help)
    group.add_argument("--clip-root", default=None,
                       help="download folder of CLIP weights (default: CLIP's own, ~/.cache/clip)")
