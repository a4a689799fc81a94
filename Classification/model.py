"""The final classifier: torchvision's ResNet with fc = Sequential(Linear(features, C)).

That is the layout of the released `result.pth` (`fc.0.weight`, `fc.0.bias`, torchvision
names elsewhere), so the official file loads with strict=True and needs no mapping. Our
checkpoints hold the same state dict plus metadata (see `checkpoint_meta`).
"""
import warnings

import torchvision
from torch import nn

from tgn.checkpoint import load_all_but_classifier, load_checkpoint, load_weights, state_dict_of
from tgn.class_names import DIOR_CLASSES, names_unlike_dior, refuse_renamed_class
from tgn.errors import UserError
from tgn.resnet import ARCHS, feature_resnet_to_torchvision, imagenet_state_dict

CHECKPOINT_FORMAT = "tgn-classifier/1"


def build_classifier(arch="resnet50", num_classes=20):
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Sequential(nn.Linear(model.fc.in_features, num_classes))
    model.config = {"arch": arch, "num_classes": num_classes}
    return model


def initialise_backbone(model, spec):
    """All but `fc` from 'imagenet', 'none' or a weight file (torchvision's, result.pth, ours,
    or a KMDN model such as M_T.pth, whose shortcut.* are torchvision's downsample.*).

    `fc` keeps its fresh initialisation: the source's class count may differ.
    """
    if spec == "none":
        return model
    arch = model.config["arch"]
    if spec == "imagenet":
        state = imagenet_state_dict(arch)
    else:
        state = state_dict_of(load_checkpoint(spec, "pretrained weights"), f"--pretrained {spec}")
    return load_all_but_classifier(model, feature_resnet_to_torchvision(state), f"--pretrained {spec}",
                                   f"--arch {arch}")


def infer_arch(state_dict):
    """Bottleneck blocks have a conv3; basic blocks do not."""
    return "resnet50" if "layer1.0.conv3.weight" in state_dict else "resnet18"


def load_classifier(path):
    """Rebuild the classifier from one of our checkpoints or an official bare state dict.

    Returns (model, meta); meta is {} for a bare state dict (class ids unknown).
    """
    checkpoint = load_checkpoint(path, "classifier checkpoint")
    state = state_dict_of(checkpoint, f"classifier checkpoint {path}")
    if "fc.0.weight" not in state:
        raise UserError(f"{path} is not a classifier checkpoint (no fc.0.weight; KMDN/CDTG files do not fit here)")
    meta = {key: value for key, value in checkpoint.items() if key != "state_dict"} if "state_dict" in checkpoint else {}
    config = meta.get("model_config") or {"arch": infer_arch(state), "num_classes": int(state["fc.0.weight"].shape[0])}
    model = build_classifier(**config)
    load_weights(model, state, path)
    return model, meta


def check_classes(meta, model, class_ids, path, data_root, class_names=None):
    """Refuse a model whose outputs are not DATA's classes (output index = rank of the class id)."""
    num_outputs = model.config["num_classes"]
    if meta.get("class_ids") is not None and list(meta["class_ids"]) != list(class_ids):
        raise UserError(f"{path} was trained on classes {meta['class_ids']}, {data_root} has {list(class_ids)}")
    refuse_renamed_class(meta.get("class_names"), class_names or (), class_ids, path, data_root,
                         ": another dataset or class numbering")
    if num_outputs != len(class_ids):
        raise UserError(f"{path} has {num_outputs} outputs but {data_root} has {len(class_ids)} classes; "
                        "use the dataset the model was trained on")
    if not meta and class_names and list(class_ids) == list(range(len(DIOR_CLASSES))):
        # A bare state dict (the released result.pth) records no names: its outputs are DIOR's
        # classes in their official id order. A 20-class dataset named otherwise is scored as if
        # it were DIOR.
        other = names_unlike_dior(class_ids, class_names)
        if other:
            warnings.warn(f"{path} records no class names (the released result.pth's format): its outputs are taken "
                          f"as DIOR's classes in their official order, but {data_root} names class {other[0]} "
                          f"'{class_names[other[0]]}', DIOR's is '{DIOR_CLASSES[other[0]]}' ({len(other)} of 20 "
                          "differ): the report is only right if the model was trained on this numbering")


def checkpoint_meta(model, class_ids, class_names, train_counts, generated_counts, method, options):
    """Stored with every classifier checkpoint; lists follow the model's output order."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": dict(model.config),
        "class_ids": list(class_ids),
        "class_names": list(class_names),
        "train_counts": list(train_counts),
        "generated_counts": list(generated_counts),
        "method": method,
        "options": options,
    }
