"""The CDTG training loop: StyleGAN2 (SWAGAN) with lazy regularisation, EMA and ADA,
conditioned on tail labels, with fused noise, the tail teacher's loss and the CLIP loss.

Every step reseeds the random generators from (seed, step) and draws its batch from
StepBatchSampler, so a resumed run continues exactly as the uninterrupted one.

Under torchrun (as rosinality's StyleGAN2 runs under DistributedDataParallel): G (with
the noise fusion) and D are wrapped in DDP without buffer broadcasts; every pass that
back-propagates into them, the R1 and path-length passes included, goes through the DDP
module, and the `0 * output` terms keep every parameter in those graphs, so gradients
are averaged over the processes at each backward. The EMA generator and the EMA fusion layer follow the
unwrapped G; losses are averaged over the processes for logging, ADA's statistics
are summed over them, and the running mean path length is the processes' mean. `--batch`
is the global batch (see CDTG/parallel.py for how each process takes its share).

Mixed precision (--amp, off by default) covers the D-step and G-step passes (G's
synthesis convolutions, D, the teacher and CLIP); the mapping network, the losses and
the R1 and path-length regularisers stay in fp32, as in StyleGAN2-ADA.
"""
import copy
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from PIL import Image
from torchvision.utils import make_grid

from CDTG.augment import AdaptiveAugment, augment
from CDTG.checkpoint import (cut_to_generation, load_cdtg_checkpoint, numbered_checkpoints, official_not_resumable,
                             save_cdtg_checkpoint)
from CDTG.compilation import compile_swagan
from CDTG.config import ada_interval
from CDTG.losses import (d_logistic_loss, d_r1_loss, g_nonsaturating_loss, g_path_regularize,
                         teacher_classification_loss)
from CDTG.parallel import FusedGenerator, StepNoise
from CDTG.tail_data import StepBatchSampler
from tgn import distributed as dist
from tgn.checkpoint import load_weights
from tgn.engine import autocast, worker_context, workers_starting
from tgn.optim import adam, restore_optimizer
from tgn.errors import CollectiveError, UserError
from tgn.io import append_jsonl, trim_jsonl
from tgn.progress import progress_bar
from tgn.resume import check_same_classes
from tgn.stopping import leave_signals_to_the_trainer, stop_between_steps, stop_for, stopping_line

# What a checkpoint needs to continue a run (fusion_ema and ada are optional: earlier versions).
RESUMABLE = ("g", "d", "g_ema", "fusion", "g_optim", "d_optim", "ada_aug_p", "mean_path_length", "step")
SAMPLES_PER_CLASS = 8  # a row of each sample grid: one class, up to 8 rows


def set_requires_grad(module, flag):
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


@torch.no_grad()
def all_finite(module):
    return bool(torch.stack([torch.isfinite(parameter).all() for parameter in module.parameters()]).all())


@torch.no_grad()
def accumulate(ema, model, decay):
    """EMA of the generator's parameters (buffers such as fixed noise stay as they are), in a
    few multi-tensor kernels instead of two per parameter."""
    ema_params = dict(ema.named_parameters())
    targets, sources = zip(*[(ema_params[name], parameter.detach()) for name, parameter in model.named_parameters()])
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1 - decay)


class CdtgTrainer:
    """Holds the models, optimisers and state of one CDTG run."""

    def __init__(self, generator, discriminator, g_ema, fusion, teacher, clip_loss, cfg, device, out_dir,
                 metadata):
        self.g, self.d, self.g_ema, self.fusion = generator, discriminator, g_ema, fusion
        # The fusion layer is the generator's first layer: it is averaged with the rest of G,
        # so that g_ema's mapping network meets the fusion it was averaged along with.
        self.fusion_ema = copy.deepcopy(fusion)
        self.sample_writer, self.sample_write = None, None  # write_samples' thread, and its grid being written
        self.teacher, self.clip_loss, self.cfg, self.device = teacher, clip_loss, cfg, device
        self.out_dir = Path(out_dir)
        self.metadata = metadata
        self.settled_checkpoints = set()  # older checkpoints --keep-full has dealt with (cut_to_generation)
        for module in (self.g, self.d, self.g_ema, self.fusion, self.fusion_ema, self.teacher):
            module.to(device)
        # The teacher is frozen: eval mode (BatchNorm statistics never see fakes), no
        # parameter gradients, yet gradients flow through it to the fake images.
        self.teacher.eval()
        set_requires_grad(self.teacher, False)
        for module in (self.g_ema, self.fusion_ema):
            module.eval()
            set_requires_grad(module, False)
        # Lazy regularisation: scale lr and betas by the fraction of steps that update.
        g_ratio = cfg.g_reg_every / (cfg.g_reg_every + 1)
        d_ratio = cfg.d_reg_every / (cfg.d_reg_every + 1)
        self.g_optim = adam(list(self.g.parameters()) + list(self.fusion.parameters()),
                            lr=cfg.lr * g_ratio, betas=(0 ** g_ratio, 0.99 ** g_ratio))
        self.d_optim = adam(self.d.parameters(), lr=cfg.lr * d_ratio, betas=(0 ** d_ratio, 0.99 ** d_ratio))
        # --augment with --augment-p > 0 fixes p; with 0 the ADA controller tunes it.
        adaptive = cfg.augment and cfg.augment_p == 0
        self.ada = AdaptiveAugment(cfg.ada_target, cfg.ada_length, ada_interval(cfg), device) if adaptive else None
        self.ada_p = cfg.augment_p if cfg.augment else 0.0
        self.step = 0
        self.seconds_before = 0.0  # trained by the runs this one resumes: metrics count the run's seconds in all
        self.fit_started = None
        self.mean_path_length = torch.tensor(0.0, device=device)
        self.ema_decay = 0.5 ** (32 / (cfg.ema_half_life_kimg * 1000))
        self.local_batch = dist.local_batch(cfg.batch, "--batch")
        self.noise = StepNoise(device, fusion.config["latent_dim"], cfg.mixing, generator.noise_shapes(),
                                generator.n_latent)
        # Through DDP (a no-op outside torchrun) for every pass that back-propagates into G or D.
        self.g_fused = FusedGenerator(self.g, self.fusion)
        self.g_train = dist.wrap(self.g_fused, device, sync_buffers=False)
        self.d_train = dist.wrap(self.d, device, sync_buffers=False)
        # D's last layer (one output) gets a [1, C] gradient with strides (1, 1): DDP copies it
        # into its bucket and says so once; harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # Double backward (R1, path length) is not supported by torch.compile: those passes stay eager.
        self.g_main = compile_swagan(self.g_train, True, device) if cfg.compile else self.g_train
        self.d_main = compile_swagan(self.d_train, True, device) if cfg.compile else self.d_train

    # ----- checkpoints -----------------------------------------------------------------
    def state(self):
        return {
            **self.metadata,
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "g_ema": self.g_ema.state_dict(),
            "fusion": self.fusion.state_dict(),
            "fusion_ema": self.fusion_ema.state_dict(),
            "g_optim": self.g_optim.state_dict(),
            "d_optim": self.d_optim.state_dict(),
            "ada_aug_p": float(self.ada_p),
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "mean_path_length": float(self.mean_path_length),
            "step": self.step,
            "seconds": round(self.seconds(), 2),
        }

    def seconds(self):
        """Seconds of training so far, over every call of the run."""
        return self.seconds_before + (time.time() - self.fit_started if self.fit_started is not None else 0.0)

    def save(self):
        for name, module in (("generator", self.g), ("discriminator", self.d)):
            if not all_finite(module):  # a checkpoint never holds a diverged model
                raise UserError(f"the {name}'s weights became non-finite by step {self.step}; nothing saved; "
                                "lower --lr or check the data")
        path = self.out_dir / "checkpoint" / f"{self.step}.pt"
        save_cdtg_checkpoint(path, self.state())
        if self.cfg.keep_full:
            cut = cut_to_generation(path.parent, self.cfg.keep_full, self.settled_checkpoints)
            if len(cut) > 1:  # a run of an earlier version, or one resumed with a smaller --keep-full: say so once
                print(f"cut {len(cut)} older checkpoints to what generation reads (--keep-full {self.cfg.keep_full}); "
                      "only the newest can be resumed from")
        return path

    def resume(self):
        found = list(numbered_checkpoints(self.out_dir / "checkpoint").values())
        if not found:
            return False
        path = found[-1]
        try:
            state = load_cdtg_checkpoint(path)
        except UserError as exc:  # damaged (a copy cut short, a full disk of an earlier version)
            # The one before is whole (not cut to what generation reads) when --keep-full keeps two or all.
            whole_before = len(found) > 1 and self.cfg.keep_full != 1
            before = f"move it away to resume from {found[-2].name}, " if whole_before else ""
            raise UserError(f"--resume: {exc}; {before}or pass --overwrite instead of --resume to start "
                            "again") from None
        if state.get("generation_only"):
            raise UserError(f"{path} keeps only what generation reads (an older checkpoint, cut by --keep-full): it "
                            "cannot continue the run; restore the newer ones, or pass --overwrite instead of --resume "
                            "to start again")
        if state.get("official"):  # no fusion layer, no path-length mean: nothing to continue exactly
            raise official_not_resumable(path)
        missing = [key for key in RESUMABLE if key not in state]
        if missing:  # a file of another kind
            raise UserError(f"{path} holds no {missing[0]!r} to resume from (not a checkpoint of CDTG/train.py?); "
                            "move it out of the run folder, or pass --overwrite instead of --resume to start again")
        check_same_classes(state.get("class_ids"), self.metadata["class_ids"], path, "tail classes")
        if state.get("teacher_fingerprint", self.metadata.get("teacher_fingerprint")) != \
                self.metadata.get("teacher_fingerprint"):
            raise UserError(f"{path} was trained with another teacher (its weights differ from --teacher "
                            f"{self.metadata.get('teacher')}); resume with the teacher it started with, or pass "
                            "--overwrite instead of --resume to start again")
        # What the run trains on. Checkpoints of earlier versions recorded no image counts.
        if state.get("train_counts", self.metadata.get("train_counts")) != self.metadata.get("train_counts"):
            raise UserError(f"{path} was trained on {state['train_counts']} images per tail class, --data has "
                            f"{self.metadata['train_counts']}; resume with the data it started with, or pass "
                            "--overwrite instead of --resume to start again")
        if self.clip_loss is not None and state.get("clip_fingerprint", self.metadata.get("clip_fingerprint")) != \
                self.metadata.get("clip_fingerprint"):  # runs of earlier versions recorded none
            raise UserError(f"{path} was trained with another CLIP model (its weights differ from --clip's); the "
                            "CLIP loss would change mid-run: resume with the CLIP it started with, or pass "
                            "--overwrite instead of --resume to start again")
        if self.clip_loss is not None and state.get("prompts") != self.metadata.get("prompts"):
            raise UserError(f"{path} was trained with the prompts {state.get('prompts')}, --data has "
                            f"{self.metadata.get('prompts')}; the CLIP loss would change mid-run: restore them, or "
                            "pass --overwrite instead of --resume to start again")
        if state.get("fusion_config") != self.fusion.config:
            earlier = "lr_mul" not in (state.get("fusion_config") or {"lr_mul": None})
            hint = (" (a run of an earlier version: resume it with --fusion-lr-mul 0 --flip, and --ada-every 256 "
                    "if it had --augment: the settings it was trained with)" if earlier else "")
            raise UserError(f"{path} has another noise-fusion layer ({state.get('fusion_config')}); resume with the "
                            f"flags it was trained with (--fusion-pool, --fusion-lr-mul) or use another --out{hint}")
        for module, key in ((self.g, "g"), (self.d, "d"), (self.g_ema, "g_ema"), (self.fusion, "fusion")):
            load_weights(module, state[key], path)
        # Checkpoints of earlier versions kept no average of the fusion layer: it starts from the layer.
        load_weights(self.fusion_ema, state.get("fusion_ema") or state["fusion"], path)
        restore_optimizer(self.g_optim, state["g_optim"])
        restore_optimizer(self.d_optim, state["d_optim"])
        self.ada_p = state["ada_aug_p"]
        if self.ada is not None and state.get("ada"):
            self.ada.load_state_dict(state["ada"])
        self.mean_path_length = torch.tensor(state["mean_path_length"], device=self.device)
        self.step = state["step"]
        self.seconds_before = float(state.get("seconds", 0.0))  # checkpoints of earlier versions have none
        if dist.is_main():
            print(f"resuming from {path} at step {self.step}")
        return True

    def start_from(self, state, path):
        """--init: G, D and G_ema from another checkpoint (checked by the caller), and the
        noise-fusion layer with its average where the file has one of these settings; the
        optimizers, ADA's p, the path-length mean and the step start afresh."""
        for module, key in ((self.g, "g"), (self.d, "d"), (self.g_ema, "g_ema")):
            load_weights(module, state[key], path)
        fusion = state.get("fusion")
        if fusion is not None and state.get("fusion_config") == self.fusion.config:
            load_weights(self.fusion, fusion, path)
            load_weights(self.fusion_ema, state.get("fusion_ema") or fusion, path)
        elif dist.is_main():
            held = ("none (the official format)" if fusion is None else
                    f"one of other settings ({state.get('fusion_config')}; this run's: {self.fusion.config})")
            warnings.warn(f"--init {path} holds {held}: the noise-fusion layer starts afresh")
        if dist.is_main():
            print(f"starting from the weights of {path}: new optimizers, step 0")

    # ----- one step ----------------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.cfg.amp)

    def generate(self, module, batch, features, labels, **kwargs):
        """Fakes (and latents when asked) from this step's shared noise, this process's share."""
        latents, crossover = self.noise.latents(batch)
        return module(latents, features, self.cfg.fusion_noise, labels, noise=self.noise.noise_maps(batch),
                      inject_index=crossover, **kwargs)

    def maybe_augment(self, images):
        if self.ada_p <= 0:
            return images
        augmented, _ = augment(images, self.ada_p)
        return augmented

    def generator_loss(self, fake, labels):
        """Adversarial + lambda_cls * M_T's CE + lambda_clip * CLIP's CE, all back-propagated;
        also the parts (detached) for logging."""
        cfg = self.cfg
        g_adv = g_nonsaturating_loss(self.d_main(self.maybe_augment(fake), labels).float())
        total, parts = g_adv, {"g_adv": g_adv.detach()}
        if cfg.lambda_cls > 0:
            cls_loss = teacher_classification_loss(self.teacher, fake, labels)
            total = total + cfg.lambda_cls * cls_loss
            parts["cls"] = cls_loss.detach()
        if cfg.lambda_clip > 0 and self.clip_loss is not None:
            clip_loss = self.clip_loss(fake, labels)
            total = total + cfg.lambda_clip * clip_loss
            parts["clip"] = clip_loss.detach()
        return total, parts

    def train_step(self, real, labels):
        """One D step (+ R1 every d_reg_every), one G step (+ path length every g_reg_every), EMA.
        `real` and `labels` are this process's share of the step's batch; returns this
        process's losses as tensors on the device (see read_losses)."""
        cfg, step, batch = self.cfg, self.step, real.shape[0]
        losses = {}
        with torch.no_grad():
            _, features = self.teacher(real)

        # Discriminator.
        set_requires_grad(self.g_fused, False)
        set_requires_grad(self.d, True)
        with torch.no_grad(), self.autocast():
            fake, _ = self.generate(self.g_fused, batch, features, labels)
        with self.autocast():
            fake_pred = self.d_main(self.maybe_augment(fake), labels).float()
            real_pred = self.d_main(self.maybe_augment(real), labels).float()
        d_loss = d_logistic_loss(real_pred, fake_pred)
        self.d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optim.step()
        losses.update(d=d_loss.detach(), real_score=real_pred.detach().mean(), fake_score=fake_pred.detach().mean())
        if self.ada is not None:
            self.ada_p = self.ada.tune(real_pred)

        if step % cfg.d_reg_every == 0:
            real_for_r1 = real.detach().requires_grad_(True)
            real_pred = self.d_train(self.maybe_augment(real_for_r1), labels)
            r1 = d_r1_loss(real_pred, real_for_r1)
            self.d.zero_grad(set_to_none=True)
            # The 0 * real_pred term keeps every D output in the graph (as StyleGAN2 does).
            (cfg.r1 / 2 * r1 * cfg.d_reg_every + 0 * real_pred[0]).sum().backward()
            self.d_optim.step()
            losses["r1"] = r1.detach()

        # Generator.
        set_requires_grad(self.g_fused, True)
        set_requires_grad(self.d, False)
        with self.autocast():
            fake, _ = self.generate(self.g_main, batch, features, labels)
            g_loss, parts = self.generator_loss(fake, labels)
        losses.update(parts)
        self.g_fused.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_optim.step()
        losses["g"] = g_loss.detach()

        if cfg.path_regularize > 0 and step % cfg.g_reg_every == 0:
            path_batch = max(1, batch // cfg.path_batch_shrink)
            fake, latents = self.generate(self.g_train, path_batch, features[:path_batch], labels[:path_batch],
                                          return_latents=True)
            path_loss, path_mean, path_lengths = g_path_regularize(
                fake, latents, self.mean_path_length, noise=self.noise.randn(path_batch, *fake.shape[1:]))
            # Each process's running mean moved by its own lengths; their mean is the global one.
            self.mean_path_length = dist.all_reduce_(path_mean.clone(), average=True)
            self.g_fused.zero_grad(set_to_none=True)
            weighted = cfg.path_regularize * cfg.g_reg_every * path_loss
            # As rosinality's loop: the output joins the graph, so DDP sees every parameter used.
            weighted = weighted + 0 * fake[0, 0, 0, 0]
            weighted.backward()
            self.g_optim.step()
            losses.update(path=path_loss.detach(), path_length=path_lengths.detach().mean())

        accumulate(self.g_ema, self.g, self.ema_decay)
        accumulate(self.fusion_ema, self.fusion, self.ema_decay)
        return losses

    def read_losses(self, losses):
        """A step's losses (train_step's tensors) as numbers averaged over the processes,
        checked to be finite. Reading waits for the GPU to finish the step, so the loop reads
        only every --log-every steps and lets the GPU run ahead in between; it is a collective
        under torchrun: every process reads at the same steps."""
        values = dist.all_reduce_(torch.stack([value.float() for value in losses.values()]), average=True)
        numbers = dict(zip(losses, values.tolist()), ada_p=float(self.ada_p))
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise CollectiveError(f"the {name} loss became {value} by step {self.step}; lower --lr or check the data")
        return numbers

    # ----- samples -------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self, sample_z, sample_labels, sample_real):
        _, features = self.teacher(sample_real)
        z = self.fusion_ema(sample_z, features, self.cfg.fusion_noise)
        images, _ = self.g_ema([z], sample_labels)
        path = self.out_dir / "sample" / f"{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, nrow=SAMPLES_PER_CLASS, normalize=True, value_range=(-1, 1))
        pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()  # as save_image
        # The PNG is encoded while training goes on: at 256 px, 0.7 s every --sample-every steps
        # the GPU would wait (about 4% of the paper's run). One grid waits at most.
        self.finish_samples()
        self.sample_writer = self.sample_writer or ThreadPoolExecutor(max_workers=1)
        self.sample_write = self.sample_writer.submit(lambda: Image.fromarray(pixels).save(path))

    def finish_samples(self, close=False):
        """Wait for the sample grid being written (its error, a full disk say, is raised
        here); `close`: let its thread go too."""
        write, self.sample_write = self.sample_write, None
        if write is not None:
            write.result()
        if close and self.sample_writer is not None:
            self.sample_writer.shutdown()
            self.sample_writer = None

    # ----- loop ----------------------------------------------------------------------------
    def fit(self, dataset, sample_set):
        """Train until cfg.iterations; checkpoint every save_every steps and at the end.
        `sample_set` (z, labels, real images of the sample grid) is needed on rank 0 only."""
        cfg, main = self.cfg, dist.is_main()
        if main:  # lines logged after the checkpoint (or, without one, by a run killed before it) go
            trim_jsonl(self.out_dir / "metrics.jsonl", "step", self.step)
        sampler = StepBatchSampler(len(dataset), cfg.batch, cfg.seed, self.step, cfg.iterations)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=self.device.type == "cuda", worker_init_fn=leave_signals_to_the_trainer,
                            multiprocessing_context=worker_context(cfg.workers))
        self.fit_started = time.time()
        with stop_between_steps() as stop_requested:
            with workers_starting(cfg.workers):  # they set their signal handling first
                batches = iter(loader)
            progress = progress_bar(batches, total=len(sampler), desc="cdtg", disable=not main)
            for real, labels in progress:
                self.noise.reseed(cfg.seed, self.step)
                real, labels = real.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if cfg.flip:
                    flip = self.noise.flips(real.shape[0])
                    real = torch.where(flip.view(-1, 1, 1, 1), real.flip(3), real)
                losses = self.train_step(real, labels)
                self.step += 1
                interrupted = stop_requested()
                log = self.step % cfg.log_every == 0 or self.step == cfg.iterations
                if log or interrupted or self.step % cfg.save_every == 0:  # nothing non-finite is saved
                    losses = self.read_losses(losses)
                    if main:
                        progress.set_postfix({k: f"{v:.3f}" for k, v in losses.items()
                                              if k in ("d", "g_adv", "cls", "clip", "r1", "ada_p")})
                if main:
                    if self.sample_write is not None and self.sample_write.done():
                        self.finish_samples()  # a failed write (a full disk) stops the run now, not a grid later
                    if log:
                        append_jsonl(self.out_dir / "metrics.jsonl",
                                     {"step": self.step, **losses, "seconds": round(self.seconds(), 2)})
                    if self.step % cfg.sample_every == 0:
                        self.write_samples(*sample_set)
                    if interrupted:
                        progress.close()  # its line ended: the stopping line is one of its own
                        print(stopping_line(interrupted, f"saving step {self.step}"), flush=True)
                    if interrupted or self.step % cfg.save_every == 0:
                        self.save()
                if interrupted:
                    self.finish_samples(close=True)
                    dist.barrier()  # the checkpoint is whole before any process stops
                    stop_for(interrupted)
        if main and not (self.out_dir / "checkpoint" / f"{self.step}.pt").exists():
            self.save()
        self.finish_samples(close=True)
        dist.barrier()  # the last checkpoint is complete before any process reads it
        return self.step
