"""CLIP text-consistency loss: CLIP should match each fake with "A photo of a {class name}".

Unlike the official code (images through PIL, loss under no_grad, softmax before the
cross-entropy, CLIP reloaded every step), the fake batch goes through CLIP as tensors,
so the loss has gradients; CLIP is loaded once and the text features are computed once.
"""
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tgn.errors import FETCH_WEIGHTS_HINT, UserError
from tgn.runlock import one_at_a_time

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def import_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # openai-clip imports the deprecated pkg_resources
        import clip
    return clip


def tokenize_prompts(prompts):
    """CLIP's tokens of the prompts; a prompt past CLIP's 77 tokens is a one-line error
    naming it (prompts are edited by hand in tail_classes.json)."""
    clip = import_clip()
    tokens = []
    for prompt in prompts:
        try:
            tokens.append(clip.tokenize([prompt]))
        except RuntimeError as exc:
            raise UserError(f"the prompt \"{prompt[:60]}...\" is longer than CLIP's 77 tokens; shorten it in "
                            "tail_classes.json, or in CDTG/dataset_split.py's --prompt") from exc
    return torch.cat(tokens)


def clip_download_lock(root, spec):
    """The lock file that serialises fetching CLIP `spec` into `root`."""
    return Path(root) / f".{spec.replace('/', '-')}.lock"


def fetch_clip(clip, name, download_root=None):
    """The weight file of CLIP `name` in `download_root` (default ~/.cache/clip, as
    clip.load's), downloaded unless already there with the right checksum. CLIP's download
    writes straight to the final name, so processes starting together (torchrun) would
    truncate each other's file and fail its checksum: one fetches while the others wait."""
    root = download_root or os.path.expanduser("~/.cache/clip")
    try:
        with one_at_a_time(clip_download_lock(root, name)):
            return Path(clip.clip._download(clip.clip._MODELS[name], root))
    except Exception as exc:  # offline
        raise UserError(f"cannot load CLIP {name} ({type(exc).__name__}); {FETCH_WEIGHTS_HINT} (--clip PATH), "
                        "or pass --clip none") from exc


def load_clip(spec, device, download_root=None):
    """'ViT-B/32' (or another name: downloaded when online), a local file, or 'none'.

    A file may be the official TorchScript archive or a plain state dict. clip.load
    cannot read the latter (it fails with EOFError), so both are read here and rebuilt
    with clip.model.build_model, as clip.load(jit=False) does. Weights are kept in fp32 for
    stable gradients.
    """
    if spec == "none":
        return None
    clip = import_clip()
    path = Path(spec)
    if not path.is_file():
        if spec not in clip.available_models():
            raise UserError(f"--clip {spec}: no such file, and not one of {', '.join(clip.available_models())}")
        path = fetch_clip(clip, spec, download_root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated, yet it reads CLIP's release files
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--clip {path}: neither a CLIP TorchScript archive nor a state dict") from exc
    try:
        model = clip.model.build_model(state_dict)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"--clip {path}: not a CLIP model ({type(exc).__name__}: {exc})") from exc
    return model.float().to(device).eval()


class ClipConsistencyLoss(nn.Module):
    """Cross-entropy of CLIP's scaled image-text logits against the fakes' labels."""

    def __init__(self, clip_model, prompts):
        super().__init__()
        self.clip = clip_model
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.clip.eval()
        self.resolution = clip_model.visual.input_resolution
        device = next(clip_model.parameters()).device
        with torch.no_grad():
            text = clip_model.encode_text(tokenize_prompts(prompts).to(device)).float()
        self.register_buffer("text_features", F.normalize(text, dim=-1))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1))

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen whatever the caller does
        return self

    def preprocess(self, images):
        """CLIP's own preprocessing on tensors in [-1, 1], as it would see the saved image:
        clamp to the pixel range, antialiased bicubic resize (PIL's), normalise.

        Fakes are square, so CLIP's center crop after the resize is the identity.
        """
        images = ((images.float() + 1) / 2).clamp(0, 1)
        images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                               antialias=True)
        return (images - self.mean) / self.std

    def logits(self, images):
        image_features = F.normalize(self.clip.encode_image(self.preprocess(images)).float(), dim=-1)
        return self.clip.logit_scale.exp() * image_features @ self.text_features.t()

    def forward(self, images, labels):
        return F.cross_entropy(self.logits(images), labels)
