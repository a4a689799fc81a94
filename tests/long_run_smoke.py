"""Long-run smoke test of CDTG training (not part of `make test`; run with `make smoke`).

    python tests/long_run_smoke.py --steps 3000 --work /tmp/tgn-smoke

Trains a tiny CDTG on the demo data twice: once straight through, once killed with
SIGKILL at random moments and resumed each time, until it reaches the same step. Then
checks that every logged loss is finite, that each step was logged exactly once, and that
the final checkpoints of both runs are identical. Exit status 0 means all held.
"""
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from conftest import tiny_clip  # noqa: E402
from tgn.cli import make_parser  # noqa: E402
from tgn.io import atomic_torch_save  # noqa: E402
from tgn.resnet import FeatureResNet  # noqa: E402


def run(script, *args):
    subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def prepare(work):
    run("data/make_demo.py", "--out", work / "data", "--overwrite")
    run("KMDN/dataset_split.py", "--data-root", work / "data", "--out", work / "split", "--overwrite")
    run("CDTG/dataset_split.py", "--split", work / "split", "--out", work / "cdtg_data", "--overwrite")
    tail = json.loads((work / "cdtg_data" / "tail_classes.json").read_text())["classes"]
    torch.manual_seed(0)
    teacher = FeatureResNet("resnet18", num_classes=len(tail), width=8)
    atomic_torch_save(work / "M_T.pth", {"state_dict": teacher.state_dict(), "model_config": teacher.config,
                                         "class_ids": [c["id"] for c in tail]})
    torch.save(tiny_clip().state_dict(), work / "clip.pt")


def train_command(work, out, steps, save_every):
    return [sys.executable, str(ROOT / "CDTG" / "train.py"), "--data", str(work / "cdtg_data"), "--teacher",
            str(work / "M_T.pth"), "--clip", str(work / "clip.pt"), "--out", str(out), "--size", "32", "--latent",
            "32", "--n-mlp", "2", "--channel-max", "16", "--batch", "4", "--iter", str(steps), "--save-every",
            str(save_every), "--sample-every", str(save_every), "--log-every", "1", "--workers", "0", "--device", "cpu",
            "--augment", "--resume"]


def check_metrics(out, steps):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records]
    assert logged == list(range(1, steps + 1)), f"{out}: steps logged {len(logged)}, duplicates or gaps"
    for record in records:
        for key, value in record.items():
            assert math.isfinite(value), f"{out}: {key} = {value} at step {record['step']}"


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--steps", type=int, default=3000, help="CDTG steps of each run")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--work", type=Path, default=Path("runs/smoke"), help="folder of the data and both runs")
    parser.add_argument("--kill-after", type=float, nargs=2, default=(5.0, 25.0), help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs and of the kill times")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    rng = random.Random(args.seed)

    started = time.time()
    subprocess.run(train_command(args.work, args.work / "straight", args.steps, args.save_every), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"uninterrupted run: {time.time() - started:.0f} s")

    kills = 0
    interrupted = args.work / "interrupted"
    while True:
        with open(args.work / "interrupted.log", "w") as log:
            process = subprocess.Popen(train_command(args.work, interrupted, args.steps, args.save_every),
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=rng.uniform(*args.kill_after))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            continue
        if process.returncode != 0:
            tail = (args.work / "interrupted.log").read_text()[-1500:]
            sys.exit(f"training exited with {process.returncode} after {kills} kills:\n{tail}")
        break
    print(f"interrupted run: {kills} kills")

    for out in (args.work / "straight", interrupted):
        check_metrics(out, args.steps)
    final = [torch.load(out / "checkpoint" / f"{args.steps}.pt", weights_only=True)
             for out in (args.work / "straight", interrupted)]
    for part in ("g", "d", "g_ema", "fusion"):
        for key, value in final[0][part].items():
            assert torch.equal(value, final[1][part][key]), f"{part}.{key} differs"
    print(f"ok: {args.steps} steps, {kills} kills, losses finite, final checkpoints identical")


if __name__ == "__main__":
    main()
