"""CDTG's settings and their official defaults, free of torch so that the scripts' --help
and a mistyped flag answer at once (importing torch and torchvision takes seconds)."""
from dataclasses import dataclass
from typing import Optional

DEFAULT_PROMPT = "A photo of a {name}"  # CLIP's text for each tail class


# The official code (rosinality's train.py) updates ADA's p every 8 training steps, whatever
# the batch: 64 images at batch 8.
ADA_STEPS = 8


def ada_interval(cfg):
    """Images between updates of ADA's p: --ada-every, else ADA_STEPS steps of --batch."""
    return cfg.ada_every or ADA_STEPS * cfg.batch


# What a --resume may change besides how any run goes (tgn.resume.check_resume): what is
# logged, sampled and kept, the implementation of the modulated convolution (one function),
# and where the teacher and CLIP are read from (their weights are checked instead).
RESUME_MAY_CHANGE = frozenset({"log_every", "save_every", "keep_full", "sample_every", "modconv", "teacher",
                               "clip_root",
                               "init"})  # only a run's start: a resumed run continues from its own checkpoints
ADA_FLAGS = ("augment_p", "ada_target", "ada_length", "ada_every")


def uses_clip_loss(options):
    """Whether CDTG options (a dict) train with the CLIP loss: a model (not --clip none) and
    a weight above 0. Without one of them the CLIP model is not even loaded."""
    return options.get("clip") != "none" and options.get("lambda_clip", 1) > 0  # 1: the flag's default


def resume_view(saved, now):
    """What of a run's options (`saved`) and of a --resume's (`now`) must be alike
    (tgn.resume.check_resume): whether a CLIP model is given, not which file holds it; none of
    CLIP's flags when neither call trains with its loss (no CLIP is loaded), nor ADA's when
    neither augments (they act only with --augment)."""
    inert = set()
    if not saved.get("augment") and not now.get("augment"):
        inert.update(ADA_FLAGS)
    if not uses_clip_loss(saved) and not uses_clip_loss(now):
        inert.update(("clip", "lambda_clip"))

    def view(options):
        kept = {key: value for key, value in options.items() if key not in inert}
        if "clip" in kept:
            kept["clip"] = kept["clip"] != "none"
        return kept

    return view(saved), view(now)


@dataclass
class GanConfig:
    """Official defaults (rosinality stylegan2-pytorch train.py, as used by TGN)."""

    iterations: int = 200_000
    batch: int = 8
    lr: float = 0.002
    r1: float = 10.0
    path_regularize: float = 2.0
    path_batch_shrink: int = 2
    d_reg_every: int = 16
    g_reg_every: int = 4
    mixing: float = 0.9
    fusion_noise: float = 0.8
    lambda_cls: float = 1.0
    lambda_clip: float = 1.0
    augment: bool = False
    augment_p: float = 0.0
    ada_target: float = 0.6
    ada_length: int = 500_000
    flip: bool = False  # random horizontal flips of the reals: off in the official CDTG
    ada_every: Optional[int] = None  # images between p updates; None: ADA_STEPS steps' worth
    # g_ema's decay is 0.5 ** (32 / (this * 1000)), rosinality's constant, whatever the batch:
    # a half-life of 10 kimg at batch 32, and 312.5 steps (2.5 kimg) at the default batch 8.
    ema_half_life_kimg: float = 10.0
    save_every: int = 5000
    keep_full: int = 2  # whole checkpoints kept (the newest); older ones cut to what generation reads; 0: all
    sample_every: int = 100
    log_every: int = 10
    seed: int = 0
    workers: int = 4
    amp: str = "off"  # off or bf16 (no fp16: without StyleGAN2-ADA's clamps the convolutions can overflow it)
    compile: bool = False  # torch.compile G and D for the passes without double backward

    def __post_init__(self):
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"GanConfig.amp: {self.amp!r}; use 'off' or 'bf16'")
