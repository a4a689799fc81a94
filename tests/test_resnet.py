"""The feature ResNet matches the official KMDN checkpoint format and torchvision's weights."""
import json
from pathlib import Path

import pytest
import torch
import torchvision

from tgn.checkpoint import load_weights
from tgn.errors import UserError
from tgn.resnet import FeatureResNet, load_backbone, load_feature_resnet, torchvision_to_feature_resnet

# The keys and shapes of the released checkpoints, kept beside the tests.
FORMATS = Path(__file__).resolve().parent / "official_state_dict_formats.json"
KMDN_KEY = "KMDN.ResNet(Bottleneck,[3,4,6,3],num_classes=12)"


@pytest.fixture(scope="module")
def official_kmdn_format():
    if not FORMATS.is_file():
        pytest.skip(f"{FORMATS} is not present")
    return json.loads(FORMATS.read_text())[KMDN_KEY]


def fake_state_dict(shapes):
    return {key: torch.randn(shape) if shape else torch.tensor(1) for key, shape in shapes.items()}


def test_keys_and_shapes_equal_the_official_format(official_kmdn_format):
    ours = FeatureResNet("resnet50", num_classes=12).state_dict()
    assert list(ours) == list(official_kmdn_format)
    for key, shape in official_kmdn_format.items():
        assert list(ours[key].shape) == shape, key


def test_official_state_dict_loads_strictly(official_kmdn_format, tmp_path):
    state = fake_state_dict(official_kmdn_format)
    torch.save(state, tmp_path / "official.pth")
    model, _ = load_feature_resnet(tmp_path / "official.pth")
    assert model.config == {"arch": "resnet50", "num_classes": 12, "width": 64}
    assert torch.equal(model.state_dict()["layer3.0.shortcut.0.weight"], state["layer3.0.shortcut.0.weight"])


def test_files_that_are_no_kmdn_model_are_named_with_their_flag(official_kmdn_format, tmp_path):
    import argparse

    deeper = fake_state_dict(official_kmdn_format)
    deeper.update({key.replace("layer3.5.", "layer3.6."): value for key, value in deeper.items()
                   if key.startswith("layer3.5.")})  # one block more in stage 3: no layout this code builds
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(UserError, match=r"^tail model \(--teacher\) .*deeper.pth is a ResNet of an unsupported "
                                        r"layout \(blocks per stage \(3, 4, 7, 3\)\); the KMDN models are resnet50 "
                                        r"or resnet18$"):
        load_feature_resnet(tmp_path / "deeper.pth", "tail model (--teacher)")
    torch.save({"g_ema": {}, "args": argparse.Namespace(size=256)}, tmp_path / "200000.pt")  # the official CDTG file
    with pytest.raises(UserError, match=r"^cannot load tail model \(--teacher\) .*200000.pt: it holds an "
                                        r"argparse.Namespace, as the official CDTG checkpoint \(200000.pt\) does"):
        load_feature_resnet(tmp_path / "200000.pt", "tail model (--teacher)")


def test_wrong_class_count_is_a_one_line_error(official_kmdn_format):
    state = fake_state_dict(official_kmdn_format)
    with pytest.raises(UserError, match=r"fc.weight has shape \(12, 2048\), expected \(7, 2048\)"):
        load_weights(FeatureResNet("resnet50", num_classes=7), state, "official.pth")


def test_layer3_feature_of_resnet50_at_224():
    model = FeatureResNet("resnet50", num_classes=12).eval()
    with torch.no_grad():
        logits, feature = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 12)
    assert feature.shape == (1, 1024, 14, 14) == (1, *model.feature_shape(224))


def test_torchvision_weights_give_torchvision_features():
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = FeatureResNet("resnet50", num_classes=1000).eval()
    ours.load_state_dict(torchvision_to_feature_resnet(reference.state_dict()), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)
        logits, _ = ours(images)
    torch.testing.assert_close(logits, expected)


def test_local_torchvision_file_initialises_all_but_fc(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = load_backbone(FeatureResNet("resnet18", num_classes=3), str(tmp_path / "resnet18.pth"), "resnet18")
    assert torch.equal(model.layer2[0].shortcut[0].weight, reference.layer2[0].downsample[0].weight)
    assert model.fc.weight.shape == (3, 512)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match="does not fit --arch resnet50"):
        load_backbone(FeatureResNet("resnet50", num_classes=3), str(tmp_path / "resnet18.pth"), "resnet50")


def test_every_arch_the_flags_offer_is_one_both_stages_build():
    from Classification.model import build_classifier
    from tgn.cli import ARCH_NAMES
    from tgn.resnet import ARCHS

    assert tuple(ARCHS) == ARCH_NAMES
    for arch in ARCH_NAMES:
        assert FeatureResNet(arch=arch, num_classes=3, width=8).config["arch"] == arch
        assert build_classifier(arch, num_classes=3).config["arch"] == arch


def test_a_resnet_of_the_other_layout_is_named_for_what_it_likely_is():
    """KMDN's ResNets name the projection branch shortcut.* (the official custom ResNet), the
    classifier's torchvision downsample.*: one given for the other is named so."""
    from tgn.checkpoint import check_fits

    kmdn, classifier = FeatureResNet("resnet18", num_classes=3, width=64), torchvision.models.resnet18(num_classes=3)
    with pytest.raises(UserError, match=r"18 missing and 18 unexpected parameters \(e.g. layer2.0.shortcut.0.weight\) "
                                        r"\(a torchvision ResNet's names, downsample.\*, where KMDN's ResNets have "
                                        r"shortcut.\*: a classifier, not a KMDN model\?\)$"):
        check_fits(kmdn, classifier.state_dict(), "result.pth")
    with pytest.raises(UserError, match=r"\(a KMDN ResNet's names, shortcut.\*, where torchvision's have "
                                        r"downsample.\*: a KMDN model, not a classifier\?\)$"):
        check_fits(classifier, kmdn.state_dict(), "M_T.pth")
    with pytest.raises(UserError, match=r"unexpected parameters \(e.g. [^)]*\)$"):  # no layout to name
        check_fits(kmdn, {**kmdn.state_dict(), "extra.weight": torch.zeros(1)}, "other.pth")


def test_weights_that_cannot_be_downloaded_point_to_fetch_weights(monkeypatch, tmp_path):
    """Offline (a compute node), every public weight file's error names the script that
    fetches them all where there is internet, and the flag that reads a local file."""
    import urllib.error

    import clip

    from CDTG.clip_loss import fetch_clip
    from tgn.resnet import imagenet_state_dict

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    with pytest.raises(UserError) as refused:
        imagenet_state_dict("resnet50")
    assert str(refused.value) == ("cannot get torchvision's ImageNet weights for resnet50 (URLError); run "
                                  "data/fetch_weights.py where there is internet and use what it prints (TORCH_HOME), "
                                  "or pass --pretrained PATH or --pretrained none")
    monkeypatch.setattr(clip.clip, "_download", offline)
    with pytest.raises(UserError) as refused:
        fetch_clip(clip, "ViT-B/32", str(tmp_path))
    assert str(refused.value) == ("cannot load CLIP ViT-B/32 (URLError); run data/fetch_weights.py where there is "
                                  "internet and use what it prints (--clip PATH), or pass --clip none")
