"""Generating tail images from a trained CDTG checkpoint.

Each image is determined by (seed, class id, index) alone: its noise vector, the real
image whose feature is fused in, and its noise maps come from a CPU generator seeded
with those three numbers. A run that was stopped and restarted, or run with another
batch size or number of processes, therefore writes the images an uninterrupted run
would have written, up to float rounding: matrix products and convolutions may round
differently with the batch size (BLAS and cuDNN pick their kernels by shape), which can
move a rare pixel by one level. With the same batches they are the same bytes on a CPU.

The GPU never waits for the CPU: a thread draws the next batch's inputs while the GPU
renders the current one, finished batches come back to pinned memory without blocking,
and the JPEG writer's threads (CDTG/generated_folder.py) encode and write them while later
batches render.

`compile` (generation.py --compile MODE) runs the synthesis network and the conversion to
8-bit pixels through torch.compile. Every call then has the same batch size (a class's
last, smaller batch is padded and cut back), so one graph serves the whole run; the CUDA-graph
modes (reduce-overhead, max-autotune) also remove the kernel launches, which dominate at
small batches.
"""
import hashlib
import math
import os
from pathlib import Path, PurePath

import numpy as np
import torch

from CDTG.checkpoint import load_cdtg_checkpoint
from CDTG.compilation import compile_swagan
from CDTG.fusion import NoiseFusion
from CDTG.swagan import Generator
from CDTG.tail_data import load_tail_classes, load_teacher, tail_image_dataset
from tgn.checkpoint import load_weights, weights_fingerprint
from tgn.compat import mark_cuda_graph_step
from tgn.engine import autocast, uses_cuda_graphs
from tgn.errors import UserError
from tgn.split import check_recorded_classes

FEATURE_BATCH = 64  # real images per pass of M_T; fixed, so that images do not depend on --batch


def image_seed(seed, class_id, index):
    """One image's seed, for a CPU generator, which reads its low 32 bits: distinct for every
    (class, index) of a --seed while class ids stay below 4,294 and indices below 1,000,003.
    Folded into 64 bits, which torch refuses beyond (the product passes 2**64 from --seed
    18,446,633; below it the fold changes nothing, so earlier folders extend as they were)."""
    return ((seed * 1_000_003 + class_id) * 1_000_003 + index) % 2**64


class TailSynthesizer:
    """g_ema + noise fusion + the tail model's features of the real tail images."""

    def __init__(self, g_ema, fusion, teacher, tail, device, *, modconv="shared", amp="off", compile="off",
                 skip_bad_images=False, draft=True):
        self.device, self.tail, self.amp, self.compile = device, tail, amp, compile
        self.g_ema, self.fusion, self.teacher = (module.to(device).eval() for module in (g_ema, fusion, teacher))
        self.g_ema.set_fused_modconv(modconv == "fused")
        self.size, self.latent_dim = g_ema.size, g_ema.style_dim
        self.dataset = tail_image_dataset(tail, self.size, skip_bad_images, draft)
        self.draft = draft
        self._projected, self._mean_latent = {}, {}
        self._teacher_fingerprint = None  # hashed once: a ResNet-50 is about 100 MB
        self.sources = {}  # the tail data and teacher files, set by from_checkpoint
        self._pixels = self.synthesize if compile == "off" else compile_swagan(self.synthesize, compile, device,
                                                                               dynamic=False)

    @classmethod
    def from_checkpoint(cls, ckpt_path, device, *, data=None, data_root=None, teacher=None, **options):
        """From a CDTG checkpoint (ours, or the official one with --data and --teacher)."""
        checkpoint = load_cdtg_checkpoint(ckpt_path)
        for flag, given, what in (("--data", data, "tail data"), ("--teacher", teacher, "tail model")):
            recorded = checkpoint.get(flag[2:])
            if given is None and recorded is not None and not Path(recorded).exists():
                raise UserError(f"the {what} {recorded}, recorded in {ckpt_path}, is gone (moved with its run "
                                f"folder?): pass {flag}")
        if data_root is None and checkpoint.get("data_root") is not None:  # the dataset training read
            data_root = checkpoint["data_root"]
            if not Path(data_root).is_dir():
                raise UserError(f"the dataset {data_root}, recorded in {ckpt_path}, is gone (moved?): pass --data-root")
        data = data or checkpoint.get("data")
        teacher = teacher or checkpoint.get("teacher")
        if data is None or teacher is None:
            raise UserError(f"{ckpt_path} is an official checkpoint: pass --data (CDTG/dataset_split.py output) "
                            "and --teacher (the tail model M_T)")
        tail = load_tail_classes(data, data_root)
        config = checkpoint["generator_config"]
        check_recorded_classes(ckpt_path, checkpoint, config["num_classes"], tail.ids,
                               [c["train_count"] for c in tail.classes], f"the tail data {data}", tail.names,
                               official=checkpoint.get("official"))
        g_ema = Generator(**config)
        load_weights(g_ema, checkpoint["g_ema"], ckpt_path)
        teacher_model = load_teacher(teacher, tail)
        trained_with = checkpoint.get("teacher_fingerprint")
        teacher_fingerprint = weights_fingerprint(teacher_model) if trained_with is not None else None
        if trained_with is not None and teacher_fingerprint != trained_with:
            raise UserError(f"--teacher {teacher} is not the tail model {ckpt_path} was trained with (its weights "
                            "differ: was the file replaced since?); use the teacher the generator was trained with")
        channels, height, width = teacher_model.feature_shape(config["size"])
        # The averaged fusion layer goes with g_ema; checkpoints of earlier versions have only the layer.
        fusion_state = checkpoint.get("fusion_ema") or checkpoint.get("fusion")
        if fusion_state is not None:
            fusion = NoiseFusion(**checkpoint["fusion_config"])
            load_weights(fusion, fusion_state, ckpt_path)
        elif checkpoint.get("official"):  # the official code never saved its fusion layer
            fusion = NoiseFusion.official_fallback(channels * height * width, config["style_dim"])
        else:
            raise UserError(f"{ckpt_path} holds no noise-fusion weights (fusion_ema or fusion); generate from a "
                            "checkpoint that has them")
        if fusion.config["feature_numel"] != channels * height * width:
            raise UserError(f"--teacher {teacher} gives {channels}x{height}x{width} features at {config['size']} px, "
                            f"the checkpoint's fusion expects {fusion.config['feature_numel']} values")
        # The real images decoded as training decoded them: the official code, in full (--full-decode).
        draft = not (checkpoint.get("official") or (checkpoint.get("options") or {}).get("full_decode", False))
        synth = cls(g_ema, fusion, teacher_model, tail, device, draft=draft, **options)
        synth._teacher_fingerprint = teacher_fingerprint
        synth.sources = {"data": str(Path(data).resolve()), "teacher": str(Path(teacher).resolve())}
        return synth

    @torch.no_grad()
    def projected_features(self, label):
        """fusion.embed(M_T layer3 feature) of every real image of one class, computed once,
        in chunks of FEATURE_BATCH whatever --batch is: a feature's last bits depend on its
        chunk, and the images on the features."""
        if label not in self._projected:
            indices = np.flatnonzero(self.dataset.labels == label).tolist()
            chunks = []
            for start in range(0, len(indices), FEATURE_BATCH):
                images = torch.stack([self.dataset[i][0] for i in indices[start:start + FEATURE_BATCH]])
                _, features = self.teacher(images.to(self.device))
                chunks.append(self.fusion.embed(features))
            self._projected[label] = torch.cat(chunks)
        return self._projected[label]

    def noise_sizes(self):
        return [math.prod(shape[1:]) for shape in self.g_ema.noise_shapes()]

    def noise_maps(self, noise):
        """The generator's noise maps [N, 1, H, W] from batch_inputs' rows (views: the maps
        are only added, which takes them strided as they are)."""
        return [part.unflatten(1, shape[1:])
                for part, shape in zip(noise.split(self.noise_sizes(), dim=1), self.g_ema.noise_shapes())]

    def draw_image_inputs(self, seed, class_id, index, num_real, z, noise):
        """Fill one image's noise vector `z` [D] and its noise maps, flattened one after
        another into `noise`, from its own generator; returns its real-image choice."""
        generator = torch.Generator().manual_seed(image_seed(seed, class_id, index))
        torch.randn(z.shape, generator=generator, out=z)
        real_index = int(torch.randint(num_real, (1,), generator=generator))
        # torch's CPU normal sampler takes its uniforms in blocks of 16 and every map's size is
        # a multiple of 16 (square maps from 4x4 on), so one draw for all the maps equals
        # drawing map after map, as earlier versions did (tested), in one call instead of 11 at
        # 256 px (0.17 instead of 0.20 ms an image on a CPU core), and a batch crosses to the
        # GPU in three copies.
        torch.randn(noise.shape, generator=generator, out=noise)
        return real_index

    def batch_inputs(self, class_id, indices, *, seed):
        """CPU tensors (z [N, D], real-image choices [N], noise [N, the maps' sizes summed],
        which noise_maps splits) of a batch of images, each image drawn straight into its row."""
        num_real = self.num_real(class_id)
        pinned = self.device.type == "cuda"  # the copies to the GPU then do not block
        count = len(indices)
        z = torch.empty(count, self.latent_dim, pin_memory=pinned)
        noise = torch.empty(count, sum(self.noise_sizes()), pin_memory=pinned)
        real = torch.tensor([self.draw_image_inputs(seed, class_id, index, num_real, z[row], noise[row])
                             for row, index in enumerate(indices)], dtype=torch.long)
        return z, real.pin_memory() if pinned else real, noise

    def weights_fingerprint(self):
        """Of g_ema and the fusion layer: a generation folder refuses images of other weights
        (a checkpoint replaced under the same name, as a retrained 200000.pt is)."""
        return weights_fingerprint(self.g_ema) + weights_fingerprint(self.fusion)

    def real_features_fingerprint(self):
        """Of the tail model's weights and the real images whose features are fused (named
        within their dataset, in order): what the images depend on besides g_ema and the
        fusion layer, wherever the files live now."""
        if self._teacher_fingerprint is None:
            self._teacher_fingerprint = weights_fingerprint(self.teacher)
        digest = hashlib.sha256(self._teacher_fingerprint.encode())
        for path, label in self.dataset.samples:  # named with '/' on every system, Windows too
            name = PurePath(os.path.relpath(path, self.tail.data_root)).as_posix()
            digest.update(f"{name}\t{label}\n".encode())
        return digest.hexdigest()[:16]

    def real_counts(self, class_ids):
        """{class id: real images whose features generation fuses}; computes them all, so
        that an unreadable image stops generation before anything is written."""
        return {str(cid): self.num_real(cid) for cid in class_ids}

    def num_real(self, class_id):
        return self.projected_features(self.tail.label_of()[class_id]).shape[0]

    @torch.no_grad()
    def render(self, class_id, inputs, *, ratio, truncation=1.0, batch_size=64):
        """Images [N, H, W, 3] uint8 on the device (queued, not waited for) from batch_inputs."""
        label = self.tail.label_of()[class_id]
        projected = self.projected_features(label)
        z, real, noise = (item.to(self.device, non_blocking=True) for item in inputs)
        count = z.shape[0]
        if count < batch_size:
            # Every batch has --batch rows, a short one padded with copies of its first image:
            # a kernel's rounding depends on the batch's shape, so an image then depends on
            # --batch, not on which images share its batch (other processes, a folder extended
            # later). One batch shape is also one compiled graph.
            z, real, noise = (torch.cat([item, item[:1].expand(batch_size - count, *item.shape[1:])])
                              for item in (z, real, noise))
        labels = torch.full((z.shape[0],), label, device=self.device, dtype=torch.long)
        # The mapping network stays fp32 under --amp (as StyleGAN2-ADA keeps it); only the
        # synthesis convolutions run in reduced precision.
        styles = self.g_ema.get_latent(ratio * z + (1 - ratio) * projected[real], labels)
        truncation_latent = self.mean_latent(label, ratio) if truncation < 1 else None
        if uses_cuda_graphs(self.compile):
            mark_cuda_graph_step()
        images = self._pixels(styles, labels, self.noise_maps(noise), truncation, truncation_latent)
        if uses_cuda_graphs(self.compile):
            images = images.clone()  # the graph's output memory is reused by its next replay
        return images[:count].permute(0, 2, 3, 1)

    def synthesize(self, styles, labels, noise, truncation, truncation_latent):
        """8-bit images [N, 3, H, W] from W latents (the part --compile compiles)."""
        with autocast(self.device, self.amp):
            images, _ = self.g_ema([styles], labels, noise=noise, truncation=truncation,
                                   truncation_latent=truncation_latent, input_is_latent=True)
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @torch.no_grad()
    def mean_latent(self, label, ratio, samples=4096):
        """The class's mean W (the truncation centre) over the inputs generation feeds the
        mapping network, `ratio` * noise + (1 - ratio) * a real image's projected feature,
        from a fixed seed and computed once, so that truncated images too depend on nothing
        but (seed, class id, index)."""
        key = (label, float(ratio))
        if key not in self._mean_latent:
            projected = self.projected_features(label)
            generator = torch.Generator().manual_seed(label)
            z = torch.randn(samples, self.latent_dim, generator=generator).to(self.device)
            real = torch.randint(projected.shape[0], (samples,), generator=generator).to(self.device)
            labels = torch.full((samples,), label, dtype=torch.long, device=self.device)
            latents = self.g_ema.get_latent(ratio * z + (1 - ratio) * projected[real], labels)
            self._mean_latent[key] = latents.mean(0, keepdim=True)
        return self._mean_latent[key]

    def generate(self, class_id, indices, *, ratio, seed, truncation=1.0, batch_size=64):
        """Images [N, H, W, 3] uint8 (numpy) of one class for the given image indices."""
        inputs = self.batch_inputs(class_id, indices, seed=seed)
        images = self.render(class_id, inputs, ratio=ratio, truncation=truncation, batch_size=batch_size)
        return images.cpu().numpy()


TRUNCATION_CENTRE = "mean W of the fused inputs"  # what mean_latent computes; recorded per folder
