"""Download every public weight file the pipeline uses, for compute nodes without internet.

    python data/fetch_weights.py --out weights

Run it where there is internet, then copy the folder to the cluster. Each file is checked
against the SHA-256 this script records for it (torchvision publishes the first 8 hex digits in
its file names, which is what torch.hub checks; CLIP's URLs hold the full digest); a file
already present and valid is not downloaded again. At the end it prints the environment
variable and flags that make every stage read these files instead of the network.

    OUT/torch/hub/checkpoints/<torchvision files>   TORCH_HOME=OUT/torch
    OUT/clip/ViT-B-32.pt                            --clip OUT/clip/ViT-B-32.pt
"""
import http.client
import os
import shlex
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from tgn.cli import make_parser, output_folder  # noqa: E402
from tgn.errors import UserError, cli_main  # noqa: E402
from tgn.io import FILE_MODE, file_sha256, make_folder, remove_temp_files  # noqa: E402
from tgn.progress import progress_bar  # noqa: E402
from tgn.runlock import one_at_a_time  # noqa: E402

TORCH_CHECKPOINTS = "torch/hub/checkpoints"  # torch.hub's cache layout under TORCH_HOME
CLIP_FOLDER = "clip"


@dataclass(frozen=True)
class Weight:
    name: str
    url: str
    folder: str  # under --out
    sha256: str  # the full digest, or the prefix the publisher gives
    used_for: str

    @property
    def file_name(self):
        return self.url.rsplit("/", 1)[1]


WEIGHTS = (
    Weight("resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth", TORCH_CHECKPOINTS,
           "0676ba61", "ImageNet init of M_H, M_T and the classifier (--pretrained imagenet)"),
    Weight("resnet18", "https://download.pytorch.org/models/resnet18-f37072fd.pth", TORCH_CHECKPOINTS,
           "f37072fd", "quick runs (--arch resnet18 --pretrained imagenet)"),
    Weight("clip-vit-b32", "https://openaipublic.azureedge.net/clip/models/"
           "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt", CLIP_FOLDER,
           "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
           "CDTG's CLIP loss and CLIP consistency (--clip ViT-B/32)"),
    Weight("inception-v3", "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", TORCH_CHECKPOINTS,
           "0cc3c7bd", "FID in CDTG/evaluate.py (--inception torchvision)"),
    Weight("alexnet", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", TORCH_CHECKPOINTS,
           "7be5be79", "the AlexNet trunk of LPIPS in CDTG/evaluate.py (--lpips alex)"),
)


# Seconds a connection or a read may stall before the download gives up (not the whole
# download's time): a server that answers nothing would hang the script for good.
STALL_TIMEOUT_S = 120


def download(url, target):
    """Stream `url` (http(s) or file://) into `target`, with a progress bar; the file is
    flushed to disk before it is checked and renamed (a power cut could otherwise leave a
    renamed file of zeros, which torch.hub never checks again). Returns (bytes received,
    bytes announced or None)."""
    received = 0
    with urllib.request.urlopen(url, timeout=STALL_TIMEOUT_S) as source, open(target, "wb") as output:
        total = int(source.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, transient=True, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=Path(target).name.lstrip(".")) as progress:
            for block in iter(lambda: source.read(1 << 20), b""):
                output.write(block)
                received += len(block)
                progress.update(len(block))
        output.flush()
        os.fsync(output.fileno())
    return received, total


def fetch(weight, out_dir):
    """Place one file under out_dir; returns its path and 'present' or 'downloaded'. One run
    at a time per out_dir: another would take this one's file being written for what a killed
    run left, and remove it; it waits, then finds the file there."""
    make_folder(out_dir)
    with one_at_a_time(Path(out_dir) / ".fetch_weights.lock"):
        return _fetch(weight, out_dir)


def _fetch(weight, out_dir):
    target = Path(out_dir) / weight.folder / weight.file_name
    if target.is_file() and file_sha256(target).startswith(weight.sha256):
        return target, "present"
    if target.exists() and not target.is_file():
        raise UserError(f"{target} is a folder, not the weight file; move it away")
    make_folder(target.parent)
    remove_temp_files(target.parent)  # what a run killed midway left
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            os.chmod(tmp, FILE_MODE)  # as open() would make it (mkstemp's are owner-only): a shared folder reads it
        except OSError:  # file systems without Unix permissions keep their own
            pass
        try:
            received, announced = download(weight.url, tmp)
        except (OSError, http.client.HTTPException) as exc:  # IncompleteRead: a chunked reply cut short
            raise UserError(f"cannot download {weight.url}: {exc}") from exc
        if announced is not None and received < announced:
            raise UserError(f"cannot download {weight.url}: the connection ended after {received} of {announced} "
                            "bytes; run again")
        digest = file_sha256(tmp)
        if not digest.startswith(weight.sha256):
            raise UserError(f"{weight.url}: SHA-256 {digest} does not match the expected {weight.sha256}; "
                            "the file was not kept")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target, "downloaded"


def set_variable(name, value, windows=os.name == "nt"):
    """The shell line that sets an environment variable, to paste as it is: cmd's syntax on
    Windows, where the paths printed are Windows paths (cmd's set takes the rest of the line,
    spaces included: quoted whole), else a POSIX shell's."""
    return f'set "{name}={value}"' if windows else f"export {name}={shlex.quote(str(value))}"


def offline_usage(out_dir, weights):
    """The lines that make every stage read the fetched files."""
    out_dir = Path(out_dir).resolve()
    path = {w.name: out_dir / w.folder / w.file_name for w in weights}
    offline = [flags for name, flags in (("resnet50", "--pretrained imagenet"), ("resnet18", "--pretrained imagenet"),
                                         ("inception-v3", "--inception torchvision"), ("alexnet", "--lpips alex"))
               if name in path]
    lines = [f"torchvision finds its files through TORCH_HOME ({', '.join(dict.fromkeys(offline))} then work "
             "offline):", f"  {set_variable('TORCH_HOME', out_dir / 'torch')}"] if offline else []
    if "resnet50" in path:
        lines.append(f"KMDN/UModel.py, KMDN/RModel.py, Classification/train.py: --pretrained {path['resnet50']}    "
                     "(or imagenet with TORCH_HOME)")
    if "resnet18" in path:
        lines.append(f"quick runs: --arch resnet18 --pretrained {path['resnet18']}")
    if "clip-vit-b32" in path:
        lines.append(f"CDTG/train.py, CDTG/evaluate.py: --clip {path['clip-vit-b32']}    "
                     f"(or --clip ViT-B/32 --clip-root {path['clip-vit-b32'].parent})")
    if "inception-v3" in path:
        lines.append(f"CDTG/evaluate.py: --inception {path['inception-v3']}    (or torchvision with TORCH_HOME)")
    if "alexnet" in path:
        lines.append("CDTG/evaluate.py --lpips alex: reads the AlexNet file through TORCH_HOME")
    return lines


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--out", type=output_folder, default=Path("weights"), help="folder for the weight files")
    parser.add_argument("--only", nargs="+", choices=[w.name for w in WEIGHTS], default=None,
                        help="fetch only these (default: all)")
    return parser


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    weights = [w for w in WEIGHTS if args.only is None or w.name in args.only]
    for weight in weights:
        target, status = fetch(weight, args.out)
        print(f"  {status:10s} {target}  ({weight.used_for})")
    print("\nOffline, on the compute nodes:")
    for line in offline_usage(args.out, weights):
        print(f"  {line}")


if __name__ == "__main__":
    main()
