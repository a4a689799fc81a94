"""The one training engine of the ResNet stages (UModel, RModel, Distill, Classification).

Determinism: every epoch reseeds all generators from (seed, epoch), and the data order
comes from a generator with the same seed, so a run resumed at an epoch boundary
continues exactly as the uninterrupted run would have (bit-identical on CPU).
"""
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from tgn.checkpoint import load_checkpoint, load_weights, save_checkpoint
from tgn.errors import UserError
from tgn.io import append_jsonl, trim_jsonl
from tgn.metrics import confusion_matrix, format_percent, summarize


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def make_loader(dataset, batch_size, *, train, workers=0, seed=0, epoch=0, device=None, weights=None):
    """A DataLoader whose order and augmentation depend only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sampler = None
    if train:
        if weights is not None:
            sampler = WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True, generator=generator)
        else:
            sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
        generator=generator,
        drop_last=False,
    )


def autocast(device, amp):
    """Mixed precision where asked for; a no-op context on 'off'."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def logits_of(output):
    """Feature ResNets return (logits, feature); torchvision models return logits."""
    return output[0] if isinstance(output, tuple) else output


def cross_entropy_loss(model, images, labels):
    logits = logits_of(model(images))
    return F.cross_entropy(logits, labels), logits


def step_lr(optimizer, base_lr, epoch, milestones, gamma=0.1):
    """Divide the learning rate by 1/gamma after each milestone epoch (0-indexed epochs)."""
    lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_one_epoch(model, loader, optimizer, loss_fn, device, *, desc="train", amp="off", scaler=None,
                    channels_last=False):
    """One pass over `loader`; returns mean loss and training accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for images, labels in progress:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss, logits = loss_fn(model, images, labels)
        if not torch.isfinite(loss):
            raise UserError(f"the training loss became {loss.item()}; lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        batch = labels.numel()
        total_loss += loss.item() * batch
        correct += (logits.argmax(1) == labels).sum().item()
        seen += batch
        progress.set_postfix(loss=f"{total_loss / seen:.4f}")
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


@torch.no_grad()
def predict(model, loader, device, *, amp="off", channels_last=False, desc="test"):
    """Targets and argmax predictions over `loader`, as numpy arrays."""
    model.eval()
    targets, predictions = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = logits_of(model(images))
        predictions.append(logits.argmax(1).cpu())
        targets.append(labels)
    if not targets:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(targets).numpy(), torch.cat(predictions).numpy()


def evaluate(model, loader, device, num_classes, *, head=None, tail=None, amp="off", channels_last=False):
    targets, predictions = predict(model, loader, device, amp=amp, channels_last=channels_last)
    cm = confusion_matrix(targets, predictions, num_classes)
    return cm, summarize(cm, head=head, tail=tail)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    milestones: list
    seed: int = 0
    workers: int = 0
    amp: str = "off"
    channels_last: bool = False


@dataclass
class TrainResult:
    best_accuracy: float = -math.inf
    best_epoch: int = -1
    last_summary: dict = field(default_factory=dict)
    confusion: np.ndarray = None


def make_optimizer(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model, train_set, test_set, cfg, device, out_dir, *, meta, loss_fn=cross_entropy_loss, resume=False,
        head=None, tail=None, train_weights=None, desc="epoch"):
    """Train with Adam and step learning rates; evaluate, log and checkpoint every epoch.

    Writes `last.pth` (for --resume) and `best.pth` (highest overall test accuracy) in
    `out_dir`, and one JSON line per epoch to `metrics.jsonl`. `meta` (model config,
    class ids and names, options) is stored in every checkpoint.
    """
    out_dir = Path(out_dir)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    result = TrainResult()
    start_epoch = 0
    if resume and (out_dir / "last.pth").exists():
        state = load_checkpoint(out_dir / "last.pth", "checkpoint to resume")
        if state.get("class_ids") != meta.get("class_ids"):
            raise UserError(f"{out_dir / 'last.pth'} was trained on other classes; use another --out")
        load_weights(model, state["state_dict"], out_dir / "last.pth")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        trim_jsonl(out_dir / "metrics.jsonl", "epoch", start_epoch)  # logged epochs are 1-based
        result.best_accuracy = state.get("best_accuracy", -math.inf)
        result.best_epoch = state.get("best_epoch", -1)
        print(f"resuming from {out_dir / 'last.pth'} at epoch {start_epoch + 1}/{cfg.epochs}")
    num_classes = len(meta["class_ids"])
    test_loader = make_loader(test_set, cfg.batch_size, train=False, workers=cfg.workers, device=device)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        seed_everything(epoch_seed(cfg.seed, epoch))
        lr = step_lr(optimizer, cfg.lr, epoch, cfg.milestones)
        loader = make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                             epoch=epoch, device=device, weights=train_weights)
        train_stats = train_one_epoch(model, loader, optimizer, loss_fn, device,
                                      desc=f"{desc} {epoch + 1}/{cfg.epochs}", amp=cfg.amp, scaler=scaler,
                                      channels_last=cfg.channels_last)
        cm, summary = evaluate(model, test_loader, device, num_classes, head=head, tail=tail, amp=cfg.amp,
                               channels_last=cfg.channels_last)
        accuracy = summary["overall_accuracy"]
        improved = not math.isnan(accuracy) and accuracy > result.best_accuracy
        if improved:
            result.best_accuracy, result.best_epoch = accuracy, epoch
        record = {"epoch": epoch + 1, "lr": lr, **train_stats, **summary, "seconds": round(time.time() - started, 2)}
        append_jsonl(out_dir / "metrics.jsonl", record)
        payload = {
            **meta,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "best_accuracy": result.best_accuracy,
            "best_epoch": result.best_epoch,
            "metrics": summary,
        }
        if improved:
            save_checkpoint(out_dir / "best.pth", {k: v for k, v in payload.items() if k not in ("optimizer", "scaler")})
        save_checkpoint(out_dir / "last.pth", payload)
        print(
            f"epoch {epoch + 1}/{cfg.epochs} lr {lr:.1e} loss {train_stats['train_loss']:.4f} "
            f"test OA {format_percent(accuracy)} mean-acc {format_percent(summary['mean_class_accuracy'])} "
            f"macro-F1 {format_percent(summary['macro_f1'])}" + (" *best" if improved else "")
        )
        result.last_summary, result.confusion = summary, cm
    return result
