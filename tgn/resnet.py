"""The feature ResNet of KMDN and CDTG: returns (logits, layer3 feature map).

Parameter names follow the official KMDN checkpoints (`shortcut.0` / `shortcut.1` for
the projection branch, stride on the 3x3 convolution), so their state dicts load with
strict=True. torchvision's ImageNet weights load through `torchvision_to_feature_resnet`;
`feature_resnet_to_torchvision` maps the other way, for the classifier (torchvision's ResNet)
initialised from a KMDN model.
"""
import re
from pathlib import Path

import torch
from torch import nn

from tgn.checkpoint import load_all_but_classifier, load_checkpoint, load_weights, state_dict_of
from tgn.errors import FETCH_WEIGHTS_HINT, UserError

# ResNets reduce images 32-fold: at this size or less their last stage works on 1x1 maps.
ONE_PIXEL_MAPS = 32

ARCHS = {
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet18": ("basic", (2, 2, 2, 2)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class FeatureResNet(nn.Module):
    """ResNet whose forward returns (logits, layer3 output).

    `width` scales every stage (64 = the standard network); smaller widths are for tests
    and quick CPU runs.
    """

    def __init__(self, arch="resnet50", num_classes=1000, width=64):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
        block_name, layers = ARCHS[arch]
        block = Bottleneck if block_name == "bottleneck" else BasicBlock
        self.config = {"arch": arch, "num_classes": num_classes, "width": width}
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self.feature_channels = width * 4 * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride):
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, block_stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        feature = self.layer3(x)
        x = torch.flatten(self.avgpool(self.layer4(feature)), 1)
        return self.fc(x), feature

    def feature_shape(self, image_size):
        """(C, H, W) of the layer3 feature for square inputs of `image_size` pixels."""
        side = image_size
        for _ in range(4):  # conv1, maxpool, layer2, layer3 each halve the side
            side = (side + 1) // 2
        return self.feature_channels, side, side


def torchvision_to_feature_resnet(state_dict):
    """Rename torchvision ResNet parameters (`downsample.*`) to ours (`shortcut.*`)."""
    return {re.sub(r"\.downsample\.", ".shortcut.", key): value for key, value in state_dict.items()}


def feature_resnet_to_torchvision(state_dict):
    """The reverse, for the classifier (torchvision's ResNet) initialised from a KMDN model."""
    return {re.sub(r"\.shortcut\.", ".downsample.", key): value for key, value in state_dict.items()}


def imagenet_state_dict(arch):
    """torchvision's ImageNet weights (V1, what the official `pretrained=True` gave)."""
    import torchvision

    weights = {"resnet50": "ResNet50_Weights", "resnet18": "ResNet18_Weights"}[arch]
    try:
        model = getattr(torchvision.models, arch)(weights=getattr(torchvision.models, weights).IMAGENET1K_V1)
    except Exception as exc:  # no network, no cache: say what to do instead
        raise UserError(
            f"cannot get torchvision's ImageNet weights for {arch} ({type(exc).__name__}); "
            f"{FETCH_WEIGHTS_HINT} (TORCH_HOME), or pass --pretrained PATH or --pretrained none"
        ) from exc
    return model.state_dict()


def load_backbone(model, spec, arch):
    """Initialise all but the classifier from `spec`: 'imagenet', 'none' or a file path.

    A file may be torchvision's weight file, an official KMDN state dict, or one of our
    checkpoints. The final `fc` layer always keeps its fresh initialisation (the class
    count differs from the source's).
    """
    if spec == "none":
        return model
    if spec == "imagenet":
        if model.config["width"] != 64:
            raise UserError("--pretrained imagenet needs the standard width 64; use --pretrained none")
        state = imagenet_state_dict(arch)
    else:
        state = state_dict_of(load_checkpoint(Path(spec), "pretrained weights"), f"--pretrained {spec}")
    return load_all_but_classifier(model, torchvision_to_feature_resnet(state), f"--pretrained {spec}",
                                   f"--arch {arch} --width {model.config['width']}")


def infer_config(state_dict, source="the state dict"):
    """Constructor arguments of a FeatureResNet from its bare state dict (official files)."""
    bottleneck = "layer1.0.conv3.weight" in state_dict
    layers = tuple(
        len({key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")}) for stage in range(1, 5)
    )
    for arch, (block, arch_layers) in ARCHS.items():
        if arch_layers == layers and (block == "bottleneck") == bottleneck:
            return {"arch": arch, "num_classes": int(state_dict["fc.weight"].shape[0]),
                    "width": int(state_dict["conv1.weight"].shape[0])}
    raise UserError(f"{source} is a ResNet of an unsupported layout (blocks per stage {layers}); the KMDN models "
                    f"are {' or '.join(ARCHS)}")


def load_feature_resnet(path, what="model checkpoint"):
    """Rebuild a FeatureResNet from one of our checkpoints or an official bare state dict.

    Ours carry their constructor arguments; for a bare state dict they are read off the
    parameter names and shapes. Returns (model, checkpoint).
    """
    checkpoint = load_checkpoint(path, what)
    state = state_dict_of(checkpoint, f"{what} {path}")
    if "fc.0.weight" in state and "conv1.weight" in state:
        raise UserError(f"{path} is a classifier (Classification/train.py, result.pth); the {what} is a KMDN "
                        "model (KMDN/UModel.py, RModel.py or Distill.py)")
    if "fc.weight" not in state or "conv1.weight" not in state:
        raise UserError(f"{path} is not a ResNet checkpoint (no conv1/fc weights)")
    config = checkpoint.get("model_config") if "state_dict" in checkpoint else None
    model = FeatureResNet(**(config or infer_config(state, f"{what} {path}")))
    load_weights(model, state, path)
    return model, checkpoint
