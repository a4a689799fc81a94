"""Generating tail images from a trained CDTG checkpoint.

Each image is determined by (seed, class id, index) alone: its noise vector, the real
image whose feature is fused in, and its noise maps come from a generator seeded with
those three numbers. A run that was stopped and restarted, or run with another batch
size, therefore writes exactly the images an uninterrupted run would have written.
"""
import json
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from CDTG.checkpoint import load_cdtg_checkpoint
from CDTG.fusion import NoiseFusion
from CDTG.swagan import Generator
from CDTG.tail_data import load_tail_classes, tail_image_dataset
from tgn.checkpoint import load_weights
from tgn.data import Entry, write_annotation
from tgn.errors import UserError
from tgn.io import atomic_write_bytes
from tgn.resnet import load_feature_resnet

ANNOTATION = "anno.txt"  # the name Classification/train.py --extra reads
IMAGE_NAME = re.compile(r"gen_(\d{6})\.jpg")


def image_seed(seed, class_id, index):
    return (seed * 1_000_003 + class_id) * 1_000_003 + index


def image_name(index):
    return f"gen_{index:06d}.jpg"


class TailSynthesizer:
    """g_ema + noise fusion + the tail model's features of the real tail images."""

    def __init__(self, ckpt_path, device, *, data=None, data_root=None, teacher=None):
        checkpoint = load_cdtg_checkpoint(ckpt_path)
        self.official = bool(checkpoint.get("official"))
        data = data or checkpoint.get("data")
        teacher = teacher or checkpoint.get("teacher")
        if data is None or teacher is None:
            raise UserError(f"{ckpt_path} is an official checkpoint: pass --data (CDTG/dataset_split.py output) "
                            "and --teacher (the tail model M_T)")
        self.tail = load_tail_classes(data, data_root)
        config = checkpoint["generator_config"]
        if config["num_classes"] != len(self.tail.classes):
            raise UserError(f"{ckpt_path} generates {config['num_classes']} classes, "
                            f"the tail data {data} has {len(self.tail.classes)}")
        if checkpoint.get("class_ids") not in (None, self.tail.ids):
            raise UserError(f"{ckpt_path} was trained on classes {checkpoint['class_ids']}, "
                            f"the tail data {data} has {self.tail.ids}")
        self.device = device
        self.g_ema = Generator(**config)
        load_weights(self.g_ema, checkpoint["g_ema"], ckpt_path)
        self.g_ema.to(device).eval()
        self.teacher, _ = load_feature_resnet(teacher, "tail model (--teacher)")
        self.teacher.to(device).eval()
        self.size = config["size"]
        channels, height, width = self.teacher.feature_shape(self.size)
        if checkpoint.get("fusion") is not None:
            self.fusion = NoiseFusion(**checkpoint["fusion_config"])
            load_weights(self.fusion, checkpoint["fusion"], ckpt_path)
        else:
            self.fusion = NoiseFusion.official_fallback(channels * height * width, config["style_dim"])
        if self.fusion.config["feature_numel"] != channels * height * width:
            raise UserError(f"--teacher {teacher} gives {channels}x{height}x{width} features at {self.size} px, "
                            f"the checkpoint's fusion expects {self.fusion.config['feature_numel']} values")
        self.fusion.to(device).eval()
        self.latent_dim = config["style_dim"]
        self.dataset = tail_image_dataset(self.tail, self.size)
        self._projected = {}

    @torch.no_grad()
    def projected_features(self, label, batch_size):
        """fusion.embed(M_T layer3 feature) of every real image of one class, computed once."""
        if label not in self._projected:
            indices = [i for i, (_, lab) in enumerate(self.dataset.samples) if lab == label]
            chunks = []
            for start in range(0, len(indices), batch_size):
                images = torch.stack([self.dataset[i][0] for i in indices[start:start + batch_size]])
                _, features = self.teacher(images.to(self.device))
                chunks.append(self.fusion.embed(features))
            self._projected[label] = torch.cat(chunks)
        return self._projected[label]

    def image_inputs(self, seed, class_id, index, num_real):
        """Noise vector, real-image choice and noise maps of one image."""
        generator = torch.Generator().manual_seed(image_seed(seed, class_id, index))
        z = torch.randn(self.latent_dim, generator=generator)
        real_index = int(torch.randint(num_real, (1,), generator=generator))
        noise = [torch.randn(1, *n.shape[1:], generator=generator) for n in self.g_ema.make_noise()]
        return z, real_index, noise

    @torch.no_grad()
    def generate(self, class_id, indices, *, ratio, seed, truncation=1.0, batch_size=64):
        """Images [N, H, W, 3] uint8 of one class for the given image indices."""
        label = self.tail.label_of()[class_id]
        projected = self.projected_features(label, batch_size)
        inputs = [self.image_inputs(seed, class_id, index, projected.shape[0]) for index in indices]
        z = torch.stack([item[0] for item in inputs]).to(self.device)
        real = torch.tensor([item[1] for item in inputs], device=self.device)
        noise = [torch.cat([item[2][layer] for item in inputs]).to(self.device)
                 for layer in range(len(inputs[0][2]))]
        fused = ratio * z + (1 - ratio) * projected[real]
        labels = torch.full((len(indices),), label, device=self.device, dtype=torch.long)
        truncation_latent = self.g_ema.mean_latent(4096, label) if truncation < 1 else None
        images, _ = self.g_ema([fused], labels, noise=noise, truncation=truncation,
                               truncation_latent=truncation_latent)
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()


def existing_indices(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for p in folder.iterdir() if (m := IMAGE_NAME.fullmatch(p.name))}


def encode_jpeg(pixels, quality):
    buffer = BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class JpegWriter:
    """Encodes and writes batches in worker threads (PIL releases the GIL while encoding)
    while the caller generates the next batch. At most `max_pending` batches wait, so
    memory stays bounded when the disk is slower than the generator."""

    def __init__(self, workers, quality, max_pending=2):
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.quality, self.max_pending = quality, max_pending
        self.pending = deque()

    def submit(self, folder, indices, images):
        folder.mkdir(parents=True, exist_ok=True)
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        self.pending.append([self.pool.submit(self._write, folder / image_name(i), pixels)
                             for i, pixels in zip(indices, images)])

    def _write(self, path, pixels):
        atomic_write_bytes(path, encode_jpeg(pixels, self.quality))

    def _finish_oldest(self):
        for job in self.pending.popleft():
            job.result()

    def drain(self):
        """Wait until every submitted image is on disk."""
        while self.pending:
            self._finish_oldest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.drain()  # images already generated are still written (each file atomically)
        finally:
            self.pool.shutdown()


def write_generated_annotation(out_dir, class_ids):
    """anno.txt listing exactly the images on disk, in the dataset's annotation format."""
    entries = [Entry(f"{cid}/{image_name(i)}", cid) for cid in class_ids
               for i in sorted(existing_indices(Path(out_dir) / str(cid)))]
    write_annotation(Path(out_dir) / ANNOTATION, entries)
    return entries


def check_settings(out_dir, settings, overwrite):
    """A folder keeps one set of generation settings: adding images must not mix them."""
    path = Path(out_dir) / "generation.json"
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            raise UserError(f"{out_dir} holds images generated with other settings ({', '.join(changed)}); "
                            "use another --out or pass --overwrite")


def run_generation(synth, out_dir, *, class_ids, per_class, ratio, seed, truncation, batch_size, quality, workers):
    """Generate the missing images of each class; returns {class id: images written}."""
    out_dir = Path(out_dir)
    written = {}

    with JpegWriter(workers, quality) as writer:
        for class_id in class_ids:
            folder = out_dir / str(class_id)
            existing = existing_indices(folder)
            missing = [i for i in range(per_class) if i not in existing]
            name = synth.tail.names[synth.tail.ids.index(class_id)]
            for start in tqdm(range(0, len(missing), batch_size), desc=f"class {class_id} ({name})",
                              dynamic_ncols=True, leave=False):
                indices = missing[start:start + batch_size]
                images = synth.generate(class_id, indices, ratio=ratio, seed=seed, truncation=truncation,
                                        batch_size=batch_size)
                writer.submit(folder, indices, images)
            writer.drain()  # anno.txt lists the images on disk
            written[class_id] = len(missing)
            write_generated_annotation(out_dir, synth.tail.ids)
    return written
