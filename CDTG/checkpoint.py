"""CDTG checkpoints: ours, and the official `200000.pt`.

Ours are plain data (state dicts, constructor arguments, class ids, names, prompts,
options as a dict) and load with weights_only=True. The official file also holds its
options as an `argparse.Namespace`, which weights_only refuses; we allow exactly that one
class (torch 2.4 and later can), which rebuilds a Namespace from plain values and runs no
code from the file. Nothing else in such a file is trusted.
"""
import argparse
import re
import warnings
from pathlib import Path

import torch

from tgn.checkpoint import load_failure, map_tensors
from tgn.compat import can_load_classes, loading_classes
from tgn.errors import UserError
from tgn.io import atomic_torch_save, require_file

FORMAT = "tgn-cdtg/1"


def load_cdtg_checkpoint(path):
    path = Path(path)
    newest = newest_checkpoint(path / "checkpoint") if path.is_dir() else None
    hint = f"; pass {newest}, its newest" if newest else "; pass RUN/checkpoint/STEP.pt"
    path = require_file(path, "CDTG checkpoint", hint)
    try:
        with loading_classes([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "argparse.Namespace" in str(exc) and not can_load_classes():
            raise UserError(f"cannot load CDTG checkpoint {path}: it stores its options as an argparse.Namespace "
                            f"(the official format), which torch {torch.__version__} cannot load without running "
                            "code from the file; use torch 2.4 or later") from exc
        raise UserError(f"cannot load CDTG checkpoint {path}: {load_failure(path, exc)}") from exc
    if not isinstance(checkpoint, dict) or "g_ema" not in checkpoint:
        raise UserError(f"{path} is not a CDTG checkpoint (no g_ema)")
    if checkpoint.get("format") != FORMAT:
        if not isinstance(checkpoint["g_ema"], dict) or "label_emb.weight" not in checkpoint["g_ema"]:
            raise UserError(f"{path} is not a CDTG checkpoint: its generator has no class embedding (label_emb; "
                            "an unconditional StyleGAN2 or SWAGAN?)")
        checkpoint = from_official(checkpoint)
    return checkpoint


def is_official(path):
    """Whether `path` holds an official CDTG checkpoint (no format of ours; a class-conditional
    generator; its options an argparse.Namespace). Read mapped, not loaded: the official
    file is 1.5 GB."""
    try:
        with loading_classes([argparse.Namespace]):
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unreadable, or an older file layout: the loader says why where it matters
        return "argparse.Namespace" in str(exc)  # torch before 2.4, which cannot be allowed the official options
    return (isinstance(state, dict) and isinstance(state.get("g_ema"), dict) and state.get("format") != FORMAT
            and "label_emb.weight" in state["g_ema"])


def official_not_resumable(path):
    """The error for an official checkpoint in a run folder: --resume cannot continue from
    it, --overwrite would delete it (a downloaded file)."""
    path = Path(path)
    return UserError(f"{path} is an official CDTG checkpoint, which cannot continue a run (and --overwrite would "
                     f"delete it): move it out of the run folder and start a run from its weights with --init "
                     f"{path.name}")


def from_official(checkpoint):
    """Fill in what ours record explicitly, from the official args and weight shapes."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    g_state, d_state = checkpoint["g_ema"], checkpoint.get("d", {})
    num_classes, style_dim = g_state["label_emb.weight"].shape
    n_mlp = len({key.split(".")[1] for key in g_state if key.startswith("style.") and key.endswith(".weight")})
    size = args.get("size", 256)
    generator_config = {"size": size, "style_dim": int(style_dim), "n_mlp": n_mlp, "num_classes": int(num_classes),
                        "channel_multiplier": args.get("channel_multiplier", 2)}
    discriminator_config = {"size": size, "num_classes": int(num_classes),
                            "channel_multiplier": args.get("channel_multiplier", 2)}
    label_weights = [v for k, v in d_state.items() if "label" in k and k.endswith("weight") and v.ndim == 2]
    if label_weights:
        discriminator_config["label_dim"] = int(label_weights[0].shape[1])
    return {
        **checkpoint,
        "official": True,
        "generator_config": generator_config,
        "discriminator_config": discriminator_config,
        "fusion": None,
        "step": int(args.get("iter", 0)) if "step" not in checkpoint else checkpoint["step"],
        "ada_aug_p": checkpoint.get("ada_aug_p", 0.0),
        "options": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def save_cdtg_checkpoint(path, payload):
    atomic_torch_save(path, {"format": FORMAT, **payload})


# What only training reads: D, the optimizers, the fusion layer being trained (generation
# uses its EMA), ADA's and the path-length penalty's state. At 256 px a whole checkpoint is
# about 3 GB; without these, about 0.65 GB.
TRAINING_ONLY = ("g", "d", "fusion", "g_optim", "d_optim", "ada", "mean_path_length")


def cut_to_generation(folder, keep, settled=None):
    """Keep the newest `keep` numbered checkpoints in `folder` whole (--resume reads the
    newest); cut the older ones of ours to what generation and evaluation read. Returns
    the paths cut. A file that cannot be read or replaced (another format, or on Windows
    open in another program) is left whole with a warning: training goes on.

    `settled`, a set kept over a run's saves, collects the steps dealt with (cut, left
    whole, not ours): later calls pass over them instead of reading every older file
    again and repeating a warning at every save."""
    cut, settled = [], set() if settled is None else settled
    for step, path in list(numbered_checkpoints(folder).items())[:-keep]:
        if step in settled:
            continue
        settled.add(step)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # reads no weights yet
        except Exception as exc:  # the official 200000.pt (its options need an allowance), a foreign file
            warnings.warn(f"left {path} whole: {load_failure(path, exc)}")
            continue
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("generation_only"):
            continue
        # Tensors read into memory, off the mapped file.
        kept = {key: map_tensors(value, torch.clone) for key, value in state.items() if key not in TRAINING_ONLY}
        if kept.get("fusion_ema") is None:  # runs of earlier versions saved only the layer: generation reads it
            kept["fusion_ema"] = map_tensors(state.get("fusion"), torch.clone)
        del state  # unmapped before the file is replaced (Windows refuses to replace a mapped file)
        try:
            save_cdtg_checkpoint(path, {**kept, "generation_only": True})
        except UserError as exc:
            warnings.warn(f"left {path} whole: {exc}")
            continue
        cut.append(path)
    return cut


def numbered_checkpoints(folder):
    """The numbered checkpoints (`<step>.pt`) in `folder`, {step: path} in ascending steps.
    Runs of the official code name them zero-padded (`010000.pt`); where both names of a
    step are there, ours (`10000.pt`) is the one read."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.glob("*.pt"):
        if re.fullmatch(r"\d+", path.stem):
            step = int(path.stem)
            if step not in found or path.stem == str(step):
                found[step] = path
    return dict(sorted(found.items()))


def checkpoint_steps(folder):
    """Steps of the numbered checkpoints in `folder`, ascending."""
    return list(numbered_checkpoints(folder))


def newest_checkpoint(folder):
    """The path of the highest step's checkpoint in `folder`, or None."""
    found = numbered_checkpoints(folder)
    return found[max(found)] if found else None
