"""Knowledge mutual distillation of the head model M_H and the tail model M_T.

    python KMDN/Distill.py --split runs/dior/split --out runs/dior/kmdn

Reads OUT/head/best.pth and OUT/tail/best.pth (from UModel.py / RModel.py; official bare
state dicts work too via --head-ckpt / --tail-ckpt). For the first --distill-interval
epochs M_T teaches M_H on head data, then M_H teaches M_T on tail data, alternating.
Loss = CE + alpha * MSE(student layer3, teacher layer3); the teacher is frozen.
Writes OUT/distill/M_T.pth (the distilled tail model that CDTG/train.py reads by
default), OUT/distill/M_H.pth, last.pth (for --resume), metrics.jsonl, options.json.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from KMDN.distillation import distill  # noqa: E402
from KMDN.stage import checkpoint_meta, group_datasets, open_split  # noqa: E402
from tgn.checkpoint import check_fits  # noqa: E402
from tgn.cli import (add_output_args, add_runtime_args, add_training_args, make_parser,  # noqa: E402
                     non_negative_float, positive_int, training_config)
from tgn import distributed as dist  # noqa: E402
from tgn.engine import check_one_image_batches, seed_everything  # noqa: E402
from tgn.errors import UserError, alike_in_every_process, cli_main  # noqa: E402
from tgn.io import check_run_dir, prepare_run_dir, read_json, save_options  # noqa: E402
from tgn.resnet import load_feature_resnet  # noqa: E402
from tgn.resume import check_resume, epochs_done, last_state  # noqa: E402
from tgn.split import check_official_order  # noqa: E402


OFFICIAL_IMAGE_SIZE = 224  # what the official KMDN models were trained at
RESULTS = ("last.pth", "M_H.pth", "M_T.pth")  # with metrics.jsonl, what --overwrite replaces


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--split", type=Path, default=Path("runs/split"), help="folder made by KMDN/dataset_split.py")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved since the split")
    parser.add_argument("--head-ckpt", type=Path, default=None, help="M_H checkpoint (default OUT/head/best.pth)")
    parser.add_argument("--tail-ckpt", type=Path, default=None, help="M_T checkpoint (default OUT/tail/best.pth)")
    parser.add_argument("--alpha", type=non_negative_float, default=0.2, help="weight of the layer3 feature MSE")
    parser.add_argument("--distill-interval", type=positive_int, default=50, help="epochs before the roles switch")
    add_training_args(parser, epochs=100, batch_size=64, image_size=None,
                      image_size_help="images are resized to this square size (default: the size M_H and M_T were "
                                      f"trained at; {OFFICIAL_IMAGE_SIZE} for official files)")
    add_runtime_args(parser)
    add_output_args(parser, "runs/kmdn")
    return parser


def load_group_model(path, split, group):
    """M_H or M_T, checked against the split: the class count always; for our checkpoints
    also the group and class ids they were trained on (official files record neither)."""
    model, checkpoint = load_feature_resnet(path, f"{group} model checkpoint")
    model.training_size = (checkpoint.get("options") or {}).get("image_size", OFFICIAL_IMAGE_SIZE)
    if checkpoint.get("group", group) != group:  # first: the likeliest mix-up, and the clearest message
        raise UserError(f"{path} is the {checkpoint['group']} model; the {group} model is needed here")
    expected = len(split.ids(group))
    if model.config["num_classes"] != expected:
        raise UserError(f"{path} has {model.config['num_classes']} classes, the split's {group} group has {expected}")
    if "state_dict" not in checkpoint:
        check_official_order([split.train_counts[cid] for cid in split.ids(group)], path, f"the split's {group} group")
    else:
        ids = checkpoint.get("class_ids")
        if ids is not None and list(ids) != list(split.ids(group)):
            raise UserError(f"{path} was trained on classes {ids}, the split's {group} classes are {split.ids(group)} "
                            "(another split?)")
    return model


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_run_dir(args.out / "distill", resume=args.resume, overwrite=args.overwrite, results=RESULTS, args=args)
    dist.local_batch(args.batch_size)  # divisible by the torchrun processes, checked before joining
    split = open_split(args)
    device = dist.process_device(args.device)
    seed_everything(args.seed)
    paths = {"head": args.head_ckpt or args.out / "head" / "best.pth",
             "tail": args.tail_ckpt or args.out / "tail" / "best.pth"}
    models = {group: load_group_model(paths[group], split, group) for group in paths}
    recorded = args.out / "distill" / "options.json"
    if args.image_size is None and args.resume and recorded.is_file():  # the size the run started with
        args.image_size = read_json(recorded, "options").get("image_size")
    if args.image_size is None:
        sizes = {group: model.training_size for group, model in models.items()}
        if sizes["head"] != sizes["tail"]:
            raise UserError(f"M_H was trained at {sizes['head']} px, M_T at {sizes['tail']} px; pass --image-size")
        args.image_size = sizes["head"]
    shapes = {group: model.feature_shape(args.image_size) for group, model in models.items()}
    if shapes["head"] != shapes["tail"]:  # the feature loss compares them: found now, not at the first batch
        raise UserError(f"the head and tail models give layer3 features of different shapes ({shapes['head']} vs "
                        f"{shapes['tail']}): {paths['head']} and {paths['tail']} need the same --arch and --width")
    state = last_state(args.out / "distill" / "last.pth", needs=("models", "optimizers", "epoch", "best"))
    # Runs of earlier versions recorded no split: theirs is not checked.
    check_resume(args.out / "distill", args, done=epochs_done(state), state=state,
                 data={"split_fingerprint": split.fingerprint})
    if args.resume and state is not None:  # weights of another shape are refused before anything is written
        with alike_in_every_process():  # every process reads the same file: one line
            for group, model in models.items():
                check_fits(model, state["models"].get(group, {}), args.out / "distill" / "last.pth")
    datasets = {group: group_datasets(split, group, args.image_size, args.skip_bad_images, args.cache)
                for group in paths}
    for group, (train_set, _) in datasets.items():
        check_one_image_batches(len(train_set), args.batch_size, args.image_size, device, args.sync_bn,
                                f"the {group} classes' training images")
    cfg = training_config(args, device)
    # Inputs are valid: only now is anything written (by rank 0 alone under torchrun).
    dist.init(args.device)  # joined after the input checks: an input error prints once per node
    run_dir = prepare_run_dir(args.out / "distill", resume=args.resume, overwrite=args.overwrite, results=RESULTS)
    main = dist.is_main()
    options = save_options(run_dir, args, write=main)
    metas = {group: checkpoint_meta(split, group, models[group], options) for group in paths}
    best = distill(models, datasets, metas, cfg, device, run_dir,
                   alpha=args.alpha, interval=args.distill_interval, resume=args.resume)
    if not main:
        return
    for group, accuracy in best.items():
        shown = f"{100 * accuracy:.2f}%" if accuracy > -1 else "not trained"
        print(f"{group}: best test accuracy while student {shown}")
    if best["tail"] > -1:
        print(f"distilled tail model: {run_dir / 'M_T.pth'}")
    else:  # CDTG reads M_T.pth: say loudly that it is the tail model as given
        print(f"warning: M_T was not distilled: the tail model learns in epochs {args.distill_interval + 1} to "
              f"{2 * args.distill_interval}, this run has {args.epochs}; {run_dir / 'M_T.pth'} is the tail model as "
              "given (continue with --resume --epochs N to distill it)", file=sys.stderr)


if __name__ == "__main__":
    main()
