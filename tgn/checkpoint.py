"""Checkpoints as plain data, loaded safely.

Our checkpoints are dicts: `state_dict`, `model_config` (constructor arguments),
`class_ids`/`class_names` (dataset ids in output order), `epoch`, optimizer state and
`options`. They load with `weights_only=True`. Official files are bare state dicts,
which load the same way.
"""
import errno
import hashlib
from pathlib import Path

import torch

from tgn.errors import UserError
from tgn.io import atomic_torch_save, require_file


def load_checkpoint(path, what="checkpoint"):
    """torch.load with weights_only=True; a one-line error for a missing or foreign file."""
    path = require_file(path, what, checkpoints_hint(Path(path)))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, foreign formats
        raise UserError(f"cannot load {what} {path}: {load_failure(path, exc)}") from exc


def checkpoints_hint(folder):
    """For a folder given as a checkpoint: the checkpoints in it, or in the run folders in it
    (a KMDN --out: head/best.pth, distill/M_T.pth), that were likely meant."""
    if not folder.is_dir():
        return "; pass a .pth file"
    if (folder / "best.pth").is_file():
        return f"; pass {folder / 'best.pth'}"
    found = [path for path in sorted(folder.glob("*.pth")) if path.name != "last.pth"]  # resume state, not a model
    found = found or sorted([*folder.glob("*/best.pth"), *folder.glob("*/M_*.pth")])
    found = found or [path for path in [folder / "last.pth"] if path.is_file()]  # a run with no test images
    return f"; pass one of {', '.join(map(str, found))}" if found else "; pass a .pth file"


def load_failure(path, exc):
    """Why torch.load refused `path`, in a few words (its own messages can be empty, a bare
    key, or advice to load with weights_only=False, which would run code from the file)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    text = str(exc).strip()
    if "argparse.Namespace" in text:  # what the official CDTG checkpoint stores its options as
        return "it holds an argparse.Namespace, as the official CDTG checkpoint (200000.pt) does: not this kind of file"
    if "Unsupported global" in text:  # a pickle that names classes or functions to call
        return "not a PyTorch checkpoint of plain data (loading it any other way could run code from the file)"
    if "weights_only" in text:  # torch.load's advice to retry unsafely: the file is not a checkpoint
        return "not a PyTorch checkpoint"
    # torch's zip reader on a file cut short: "PytorchStreamReader failed ...", or EINVAL from a seek
    if "PytorchStreamReader" in text or (isinstance(exc, OSError) and exc.errno == errno.EINVAL):
        return "the file is cut short or damaged (a copy or download that did not finish?)"
    if "enforce fail" in text:  # a zip archive, but not laid out as torch.save lays one out
        return "not a PyTorch checkpoint (an archive of other files)"
    first = text.splitlines()[0] if text else ""
    if len(first) < 12 or isinstance(exc, (IndexError, KeyError, EOFError)):  # e.g. "101", "pop from empty list"
        return f"not a PyTorch checkpoint or a damaged one ({type(exc).__name__}{': ' + first if first else ''})"
    return first


def state_dict_of(checkpoint, source="the file"):
    """The model weights of one of our checkpoints or of an official bare state dict."""
    weights = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values()):
        return weights
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    if isinstance(checkpoint, dict) and "g_ema" in checkpoint:
        raise UserError(f"{source} is a CDTG checkpoint (a generator), not the ResNet weights needed here")
    if isinstance(checkpoint, dict) and "models" in checkpoint and "optimizers" in checkpoint:
        raise UserError(f"{source} is Distill.py's last.pth, which only resumes its run: pass the M_H.pth or M_T.pth "
                        "it wrote beside it")
    raise UserError(f"{source} holds neither a state dict nor a model checkpoint of this project")


def load_weights(model, state_dict, source):
    """load_state_dict(strict=True) with a one-line error that names the mismatch."""
    check_fits(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def layout_hint(missing, unexpected):
    """Names a ResNet of the other layout: KMDN's name the projection branch shortcut.*
    (the official custom ResNet), torchvision's (the classifier) downsample.*."""
    kmdn_missing = any("shortcut." in key for key in missing) and any("downsample." in key for key in unexpected)
    torchvision_missing = any("downsample." in key for key in missing) and any("shortcut." in key for key in unexpected)
    if kmdn_missing and not torchvision_missing:
        return (" (a torchvision ResNet's names, downsample.*, where KMDN's ResNets have shortcut.*: a classifier, "
                "not a KMDN model?)")
    if torchvision_missing and not kmdn_missing:
        return (" (a KMDN ResNet's names, shortcut.*, where torchvision's have downsample.*: a KMDN model, not a "
                "classifier?)")
    return ""


def check_fits(model, state_dict, source):
    """Raise a one-line UserError unless `state_dict` has exactly `model`'s parameter names
    and shapes. Reads shapes only, so it suits the shapes-only state of tgn.resume.last_state,
    checked before anything is written."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        example = (missing + unexpected)[0]
        hint = layout_hint(missing, unexpected)
        raise UserError(
            f"{source} does not fit this model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected parameters (e.g. {example}){hint}"
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"{source} does not fit this model: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)} (another class count or architecture?)"
            )


def load_all_but_classifier(model, state_dict, source, target, classifier="fc."):
    """Initialise every parameter but the classifier's (it keeps its fresh init: the class
    count of `state_dict` may differ); a one-line error names what does not fit."""
    state = {key: value for key, value in state_dict.items() if not key.startswith(classifier)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise UserError(f"{source} does not fit {target} (parameter shapes differ)") from exc
    missing = [key for key in missing if not key.startswith(classifier)]
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {target}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"parameters (e.g. {(missing + unexpected)[0]})"
        )
    return model


def map_tensors(value, fn):
    """`value` (a checkpoint's plain data) with `fn` applied to each tensor in its dicts,
    lists and tuples; a state dict keeps its OrderedDict type and version `_metadata`."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        mapped = type(value)((key, map_tensors(item, fn)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            mapped._metadata = value._metadata
        return mapped
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def save_checkpoint(path, payload):
    atomic_torch_save(path, payload)


def weights_fingerprint(model):
    """A short hash of a model's parameters and buffers: the same weights give the same
    fingerprint wherever the file lives."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()[:16]
