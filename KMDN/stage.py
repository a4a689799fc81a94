"""What UModel, RModel and Distill share: datasets of one group and the feature ResNet."""
from tgn.cache import ResizeCache
from tgn.data import drop_unreadable, open_dataset
from tgn.errors import UserError
from tgn.images import ImageList, build_transform
from tgn.resnet import FeatureResNet, load_backbone
from tgn.split import check_split_matches, load_split


def open_split(args):
    """The split file (its dataset moved to --data-root, if given), checked against DATA."""
    split = load_split(args.split, data_root=args.data_root)
    check_split_matches(split, open_dataset(split.data_root))
    return split


def group_datasets(split, group, image_size, skip_bad_images=False, cache_dir=None, draft=True):
    """Training and test sets of the head or tail classes, labels = model output index;
    `cache_dir` (--cache) keeps the resized images; `draft=False` (--full-decode) decodes
    JPEGs in full."""
    train_samples = drop_unreadable(split.samples(group, "train"), skip_bad_images, f"{group} training images")
    listed = split.samples(group, "test")
    test_samples = drop_unreadable(listed, skip_bad_images, f"{group} test images", check=True)
    if not test_samples:  # fit would never find a best epoch, and Distill needs best.pth
        problem = "lists no test images" if not listed else "lists only unreadable test images"
        raise UserError(f"{split.annotation_path(group, 'test')} {problem} of the {group} classes: KMDN keeps the "
                        f"epoch of best {group} test accuracy; give some of these classes test images")
    cache = ResizeCache(cache_dir, image_size, draft) if cache_dir is not None else None
    train = ImageList(train_samples, build_transform(image_size, train=True), image_size, cache, draft=draft)
    test = ImageList(test_samples, build_transform(image_size, train=False), image_size, cache, draft=draft)
    return train, test


def build_group_model(split, group, args, resumed=False):
    """The group's ResNet, initialised by --pretrained unless `resumed` (its checkpoint's
    weights replace any: nothing to read or download)."""
    model = FeatureResNet(args.arch, num_classes=len(split.ids(group)), width=args.width)
    return model if resumed else load_backbone(model, args.pretrained, args.arch)


def checkpoint_meta(split, group, model, options):
    """Metadata stored with every KMDN checkpoint: the next stage rebuilds from it alone."""
    return {
        "format": "tgn-feature-resnet/1",
        "model_config": dict(model.config),
        "group": group,
        "class_ids": list(split.ids(group)),
        "class_names": split.names(group),
        "split_fingerprint": split.fingerprint,
        "options": options,
    }
