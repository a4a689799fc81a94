"""Command-line flags shared by the stage scripts; the paper's values are the defaults."""
import argparse
import math
import os
import warnings
from pathlib import Path

from tgn.errors import UserError, speaks
from tgn.io import map_paths

OFFICIAL_MILESTONES = [30, 60, 90, 120, 150, 180]
ARCH_NAMES = ("resnet50", "resnet18")  # tgn.resnet builds both; torch-free here for --help
COMPILE_MODES = ["off", "default", "reduce-overhead", "max-autotune"]  # torch.compile's modes, and off


def usable_cpus():
    """The cores this process may run on (a cluster job's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_process():
    """This process's share of the usable cores: under torchrun, its node's processes
    (LOCAL_WORLD_SIZE) share them."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


# DataLoader worker processes: 4, or fewer on a machine with fewer cores (more would only
# compete for them, and PyTorch warns about it).
DEFAULT_WORKERS = min(4, usable_cpus())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the docstring's command examples as written. A
    default of None (such flags say in words what happens without them) or of a switch
(off) is not shown."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.const is True):  # None; a switch off
            return action.help
        return super()._get_help_string(action)


def _number(kind, test, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):  # inf passes "positive", then turns a loss into nan mid-run
            raise argparse.ArgumentTypeError(f"{text} must be a finite number")
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# Argument types that refuse impossible values with argparse's one-line error, before
# anything is read or written.
positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0, "positive")
non_negative_float = _number(float, lambda v: v >= 0, "0 or more")
fraction = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")
open_fraction = _number(float, lambda v: 0 < v < 1, "between 0 and 1 (both excluded)")
below_one = _number(float, lambda v: v < 1, "below 1")
jpeg_quality = _number(int, lambda v: 1 <= v <= 100, "between 1 and 100")
_percent_of_classes = _number(float, lambda v: 0 < v < 100, "above 0 and below 100 (percent of classes)")
HEAD_PERCENT = 40.0  # the paper's: the top 40% of classes by training count are head


def head_percent(text):
    value = _percent_of_classes(text)
    if value < 1:  # a fraction where a percentage belongs
        warnings.warn(f"--threshold is a percentage: {value:g} means {value:g}% of the classes "
                      f"(for {100 * value:g}%, pass {100 * value:g})")
    return value


head_percent.__name__ = _percent_of_classes.__name__
# Each epoch's or step's seed is derived from it in 64-bit integers (tgn.sampling).
seed_value = _number(int, lambda v: 0 <= v < 2 ** 32, "from 0 to 4294967295")
gan_size = _number(int, lambda v: 16 <= v <= 1024 and v & (v - 1) == 0, "a power of two from 16 to 1024")


def weights_spec(text):
    """--pretrained: 'imagenet', 'none', or a file (a '~' the shell left is the home folder),
    made absolute: options.json records it, and a --resume from another folder reads it."""
    return text if text in ("imagenet", "none") else os.path.abspath(os.path.expanduser(text))


def output_folder(text):
    """argparse type of a folder the script writes into: it may exist (as a folder) or not;
    a file at its place or on its way is refused before anything runs."""
    path = Path(text).expanduser()
    for candidate in (path, *path.parents):
        if candidate.is_symlink() and not candidate.exists():  # nothing could be written through it
            raise argparse.ArgumentTypeError(f"{candidate} is a symbolic link to nothing (or to itself)")
        if candidate.exists():
            if not candidate.is_dir():
                raise argparse.ArgumentTypeError(f"{candidate} is a file, not a folder")
            break
    return path


class ParsedFlags(argparse.Namespace):
    """The parsed flags, and of their names: `given`, those the command line gave (the
    others hold their defaults), which a --resume fills from the run's record; `flags`, all
    the script's own, each to its argparse action; `paths`, those whose values are Paths;
    `repeated`, those given once per value (--extra A --extra B). Slots, so that they are no
    flags: vars(args), what options.json records and --resume compares, leaves them out."""

    __slots__ = ("given", "flags", "paths", "repeated")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, like every other error of the scripts
    (argparse's own print the whole usage block first); its flags note which were given
    (ParsedFlags)."""

    def error(self, message):
        # Under torchrun every process parses the same flags: one line per node, not per process.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if speaks() else None)

    def print_help(self, file=None):
        if speaks():
            super().print_help(file)

    def parse_known_args(self, args=None, namespace=None):
        flags = ParsedFlags() if namespace is None else namespace
        flags, extras = super().parse_known_args(args, flags)
        for key, value in vars(flags).items():  # '~' the shell left alone ("~/x", --out=~/x)
            setattr(flags, key, map_paths(value, Path.expanduser))
        if isinstance(flags, ParsedFlags):
            flags.given = self.given_flags(args)
            own = [action for action in self._actions if action.dest != argparse.SUPPRESS]
            flags.flags = {action.dest: action for action in own}
            flags.paths = frozenset(action.dest for action in own if action.type in (Path, output_folder))
            flags.repeated = frozenset(action.dest for action in own if isinstance(action, argparse._AppendAction))
        return flags, extras

    def given_flags(self, args):
        """Names of the flags `args` gives, abbreviations and --flag=value included: parsed
        again over a namespace where every flag is already set, so that argparse leaves the
        ones not given alone (it fills in defaults only where nothing is set)."""
        unset = object()
        # A flag that accumulates (--extra A --extra B) adds to what is set: None starts it.
        accumulating = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
        marks = {action.dest: None if isinstance(action, accumulating) else unset for action in self._actions
                 if action.dest != argparse.SUPPRESS}
        with warnings.catch_warnings():  # said by the parse above
            warnings.simplefilter("ignore")
            probe, _ = super().parse_known_args(args, argparse.Namespace(**marks))
        return frozenset(key for key, value in vars(probe).items() if key in marks and value is not marks[key])


def recorded_value(action, value):
    """`value`, as options.json records it, parsed again by its flag (`action`): a number
    recorded as text becomes one. Raises ValueError saying why the flag refuses it (a hand
    edit, or a value an earlier version let through)."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError("not true or false")
        return value
    if value is None:  # a flag without a value (or one a run left out: Classification's --split)
        if action.default is not None:
            raise ValueError("null, where it takes a value")
        return value
    listed = action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction)
    if isinstance(value, list) != listed:
        raise ValueError("not a list" if listed else "a list")
    parsed = [_recorded_item(action, item) for item in (value if listed else [value])]
    return parsed if listed else parsed[0]


def _recorded_item(action, item):
    if isinstance(item, (list, dict)) or (isinstance(item, bool) and action.type not in (None, str)):
        raise ValueError(f"{item!r} is not a value of it")
    if action.type in (None, str, Path, output_folder):
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not text")
    else:
        try:
            with warnings.catch_warnings():  # said when the flag was given (--threshold 0.4)
                warnings.simplefilter("ignore")
                item = action.type(str(item))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
    if action.choices is not None and item not in action.choices:
        raise ValueError(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
    return item


def make_parser(doc):
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_split_args(parser):
    """The head/tail split (KMDN/dataset_split.py) a stage starts from."""
    parser.add_argument("--split", type=Path, default=Path("runs/split"), help="folder made by KMDN/dataset_split.py")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder, if moved since the split")


def add_runtime_args(parser, *, pin_memory=True):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--seed", type=seed_value, default=0, help="seed of every random generator")
    group.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS,
                       help="DataLoader worker processes; the default is 4, or this machine's usable cores where fewer")
    if pin_memory:
        group.add_argument("--pin-memory", choices=["auto", "on", "off"], default="auto",
                           help="page-locked host memory for faster GPU copies (auto: on when the run uses a GPU)")
    # With a negation: a --resume takes the run's choice when left out, and may turn it off.
    group.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                       help="check every image once and skip (and count) unreadable ones instead of stopping")
    return group


def add_training_args(parser, *, epochs, batch_size, lr=1e-3, weight_decay=1e-4, image_size=224,
                      image_size_help="images are resized to this square size"):
    group = parser.add_argument_group("training (official defaults)")
    group.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    group.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help="images per batch in all: under torchrun each of N processes takes 1/N of it")
    group.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    group.add_argument("--weight-decay", type=non_negative_float, default=weight_decay, help="Adam weight decay")
    group.add_argument("--milestones", type=non_negative_int, nargs="*", default=OFFICIAL_MILESTONES,
                       help="epochs after which the learning rate is divided by 10 (the flag alone: never)")
    group.add_argument("--image-size", type=positive_int, default=image_size, help=image_size_help)
    add_full_decode_arg(group)
    speed = parser.add_argument_group("speed and scale")
    add_precision_args(speed, default="auto")
    speed.add_argument("--sync-bn", choices=["auto", "on", "off"], default="auto",
                       help="under torchrun, BatchNorm statistics over all processes (the global batch): "
                            "auto = on GPUs; PyTorch has no SyncBatchNorm on CPUs")
    speed.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                       help="torch.compile the model (--compile alone: mode 'default'); 'reduce-overhead' and "
                            "'max-autotune' also replay CUDA graphs, which removes the kernel-launch cost that "
                            "bounds small batches on fast GPUs; the first epoch pays the compilation")
    speed.add_argument("--cache", type=Path, default=None, metavar="DIR",
                       help="keep every image resized to --image-size in DIR (written once, read by later epochs "
                            "and runs; about 3 * size^2 bytes per image)")
    return group


def add_full_decode_arg(group, purpose="", default="by default one at least twice the target size is decoded at 1/2, "
                                                  "1/4 or 1/8 of its size first: faster, pixels a few levels apart"):
    """--full-decode, spelled alike by the trainers and test.py (README "What differs")."""
    group.add_argument("--full-decode", action="store_true",
                       help=f"decode JPEGs in full before resizing, as the official code does ({default})" + purpose)


def add_precision_args(group, *, default):
    """--amp and --channels-last, spelled alike by the trainers (default auto) and test.py (off)."""
    group.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=default,
                       help="mixed precision: auto = bf16 on GPUs (fp16 with a GradScaler where bf16 is missing), "
                            "off on CPUs")
    group.add_argument("--channels-last", nargs="?", const="on", default=default, choices=["auto", "on", "off"],
                       help="channels_last memory format: auto = on with GPUs")


def add_model_args(parser, *, width=True):
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="resnet50", choices=ARCH_NAMES,
                       help="resnet50 is the paper's; resnet18 for quick runs")
    if width:  # torchvision's ResNet (the classifier) has a fixed width
        group.add_argument("--width", type=positive_int, default=64,
                           help="base channel width (64 = standard; smaller for tests)")
    group.add_argument("--pretrained", default="imagenet", type=weights_spec,
                       help="'imagenet' (torchvision weights, downloaded when online), 'none', or a weight file")
    return group


def add_output_args(parser, default_out, out_help="run folder"):
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=output_folder, default=Path(default_out), help=out_help)
    either = group.add_mutually_exclusive_group()  # continue the run, or replace it
    either.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    either.add_argument("--overwrite", action="store_true", help="start again even if --out holds results")
    return group


def check_milestones(milestones):
    """Refuse --milestones that a new run would not mean: epoch 0, or an epoch listed twice."""
    if 0 in milestones:
        raise UserError("--milestones 0 divides --lr by 10 from the first epoch: pass a lower --lr instead")
    check_repeated_milestones(milestones)


def check_repeated_milestones(milestones):
    repeated = sorted({epoch for epoch in milestones if milestones.count(epoch) > 1})
    if repeated:
        # The scheduler divides by 10 once per listing: a typo would divide by 100 there.
        times = milestones.count(repeated[0])
        raise UserError(f"--milestones lists epoch {repeated[0]} {'twice' if times == 2 else f'{times} times'}, which "
                        f"would divide --lr by {10 ** times} there; list each epoch once")


def training_config(args, device):
    """The engine's settings from the flags, with --amp and --channels-last resolved for `device`."""
    from tgn.compat import check_amp, check_compile  # torch: here, so that the stages without a model start without it
    from tgn.distributed import SYNC_BN_NEEDS_GPUS, planned_world_size
    from tgn.engine import TrainConfig, resolve_precision
    from tgn.resnet import ONE_PIXEL_MAPS

    if not args.resume:  # runs started before these were refused still resume (check_resume checks a new run)
        check_milestones(args.milestones)
    amp, channels_last = resolve_precision(args.amp, args.channels_last, device)
    check_amp(amp, device)
    if args.sync_bn == "on" and device.type != "cuda" and planned_world_size() > 1:  # found now, not in fit()
        raise UserError(SYNC_BN_NEEDS_GPUS)
    check_compile(args.compile)
    if channels_last and args.compile != "off" and device.type == "cuda" and args.image_size <= ONE_PIXEL_MAPS:
        # Inductor predicts channels_last strides for the weight gradients of convolutions on
        # 1x1 maps, where cuDNN returns contiguous ones, and its stride check then fails in the
        # first backward (pytorch/pytorch#171622; seen on an H100 with torch 2.11).
        if args.channels_last != "auto":
            raise UserError(f"--channels-last with --compile needs --image-size above {ONE_PIXEL_MAPS} on GPUs "
                            f"(torch.compile fails on the 1x1 feature maps of smaller images); drop one of them")
        warnings.warn(f"--channels-last off: with --compile, images of {ONE_PIXEL_MAPS} px or less give 1x1 "
                      f"feature maps, whose gradients torch.compile mis-lays out in channels_last")
        channels_last = False
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        milestones=list(args.milestones), seed=args.seed, workers=args.workers, amp=amp,
        channels_last=channels_last, sync_bn=args.sync_bn, compile=args.compile, pin_memory=args.pin_memory,
    )
