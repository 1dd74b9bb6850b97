"""Training with PyTorch Lightning, kept apart from the inference core.

``main.py`` builds ``config.model`` (a plain ``AutoencoderKL`` or ``LatentDiffusion``) and wraps
it here: ``AutoencoderTrainer`` for stage 1, ``DiffusionTrainer`` for stage 2. The wrapped
model is the attribute ``model``; the Lightning checkpoint's ``state_dict`` therefore holds
``model.<official keys>`` plus EMA shadows, and ``scripts/export_model.py`` turns it into an
inference checkpoint in the official layout.
"""
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm.modules.ema import LitEma
from ldm.training import (Anchor, ConsistencyDistillation, Decoys, LossWeight, MaskWeight,
                          Replay, Timesteps, checked_ramp, lr_factor, param_groups)
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


def images_from_batch(batch, key="image"):
    """CompVis data convention: ``batch[key]`` is B x H x W x C in [-1, 1]."""
    x = batch[key]
    if x.dim() == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).contiguous().float()


class DataModuleFromConfig(pl.LightningDataModule):
    """CompVis' data section: ``train`` / ``validation`` dataset configs and a batch size.
    The training data is shuffled in an order fixed by ``shuffle_seed``, and resumes
    mid-epoch where it stopped (``StreamOrder``, ``ResumableLoader``)."""

    def __init__(self, batch_size, train, validation=None, num_workers=0, shuffle_seed=None):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_config, self.validation_config = train, validation
        # the data order follows the run's seed (lightning.seed, --seed) unless given
        self.shuffle_seed = (int(os.environ.get("PL_GLOBAL_SEED", 0)) if shuffle_seed is None
                             else shuffle_seed)

    def _loader(self, config, shuffle):
        dataset = instantiate_from_config(config)
        if shuffle:
            order = StreamOrder(len(dataset), self.batch_size, self.shuffle_seed,
                                self._batches_trained)
            return ResumableLoader(dataset, batch_size=self.batch_size, sampler=order,
                                   drop_last=True, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_config, shuffle=True)

    def _batches_trained(self):
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer else 0

    def val_dataloader(self):
        if self.validation_config is None:
            return []
        return self._loader(self.validation_config, shuffle=False)


class StreamOrder(torch.utils.data.Sampler):
    """The training order as one stream of shuffled passes over ``n`` indices, pass k a
    permutation fixed by ``(seed, k)`` and cut to whole batches. Each iteration starts
    where training stands (``position()``: the batches trained on so far, which Lightning
    restores on ``--resume``) and runs to the end of that pass, so a resumed run reads
    exactly what the uninterrupted one would have."""

    def __init__(self, n, batch_size, seed=0, position=lambda: 0):
        if n < batch_size:
            raise ValueError(f"the training set has {n} items, fewer than a batch "
                             f"({batch_size})")
        self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, position

    def __iter__(self):
        per_pass = self.n // self.batch_size
        k, done = divmod(self.position(), per_pass)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        order = torch.randperm(self.n, generator=g)[:per_pass * self.batch_size]
        return iter(order[done * self.batch_size:].tolist())

    def __len__(self):
        return self.n // self.batch_size * self.batch_size


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch (its order is a ``StreamOrder``), and
    seen as such by Lightning (``state_dict``/``load_state_dict``), which otherwise warns
    that a run resumed mid-epoch restarts the epoch's order. (Its ``__init__`` is
    DataLoader's, so Lightning can rebuild it, e.g. with a distributed sampler.)"""

    def state_dict(self):
        order = self.sampler
        return {"batches": order.position()} if isinstance(order, StreamOrder) else {}

    def load_state_dict(self, state):
        pass  # the order reads its position from the trainer's own restored count


def edge_mask(x, threshold=0.1):
    """1 where an image batch (N, C, H, W in [-1, 1]) changes between neighbouring pixels,
    dilated by one pixel; 0 on smooth areas (plain and gradient backgrounds)."""
    gx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True), (0, 1, 0, 0))
    gy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True), (0, 0, 0, 1))
    edges = (torch.maximum(gx, gy) > threshold).float()
    return F.max_pool2d(edges, 3, stride=1, padding=1)


class AutoencoderTrainer(pl.LightningModule):
    """Stage 1: reconstruction (L1 + MSE) plus a small KL term towards N(0, I).

    CompVis adds LPIPS and a patch discriminator; LPIPS needs pretrained VGG weights that an
    offline machine cannot fetch, and on flat-coloured procedural images the pixel losses
    suffice, so they are left out.
    """

    def __init__(self, model, learning_rate=4.5e-4, kl_weight=1e-6, mse_weight=1.0,
                 warmup_steps=200, init_ckpt=None, decoder_only=False, edge_weight=0.0):
        super().__init__()
        self.model = model
        self.learning_rate, self.kl_weight, self.mse_weight = learning_rate, kl_weight, mse_weight
        self.edge_weight = edge_weight
        self.warmup_steps = warmup_steps
        if init_ckpt:
            from ldm.checkpoint import load_state_dict_file
            sd = load_state_dict_file(init_ckpt)
            model.load_state_dict({k[len("model."):]: v for k, v in sd.items()
                                   if k.startswith("model.")}, strict=True)
            log.info("autoencoder initialised from %s", init_ckpt)
        # Fine-tune the decoder alone (as SD's ft-MSE VAE was): the latent space, and so any
        # diffusion model trained on it, stays valid.
        self.decoder_only = decoder_only
        if decoder_only:
            for module in (model.encoder, model.quant_conv):
                module.requires_grad_(False)

    def _losses(self, batch):
        x = images_from_batch(batch, self.model.image_key)
        reconstruction, posterior = self.model(x)
        error = reconstruction - x
        l1, mse = error.abs().mean(), error.square().mean()
        kl = posterior.kl().mean()
        losses = {"l1": l1, "mse": mse, "kl": kl}
        if self.edge_weight:
            # Small objects are a few percent of the pixels, and their corners far fewer:
            # weigh the pixels near edges of the target (1 + edge_weight) times more.
            w = 1 + self.edge_weight * edge_mask(x)
            weighted = (w * (error.abs() + self.mse_weight * error.square())).mean() / w.mean()
            losses["loss"] = weighted + self.kl_weight * kl
        else:
            losses["loss"] = l1 + self.mse_weight * mse + self.kl_weight * kl
        return losses

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        losses = self._losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()})

    def train(self, mode=True):
        super().train(mode)
        if self.decoder_only:
            self.model.encoder.eval()
        return self

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(self.warmup_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class DiffusionTrainer(pl.LightningModule):
    """Stage 2: the denoising loss (Ho et al. 2020, eq. 14) in the autoencoder's latent space,
    composed of the parts in ``ldm.training`` that the config's ``training:`` section names.

    The autoencoder is frozen and loaded from ``first_stage_ckpt``; the UNet and, when
    ``cond_stage_trainable``, the text encoder are trained, with EMA copies of both. Captions
    are replaced by "" with probability ``p_uncond`` so that classifier-free guidance works
    (Ho & Salimans 2022). ``scale_by_std`` sets ``scale_factor`` to 1/std of the first
    batch's latents (CompVis' rule), saved in the checkpoint. ``init_from`` starts from an
    exported model (an inpainting UNet widened from it), ``init_ckpt`` from a stage-2
    checkpoint.

    The parts, each with its options: ``Timesteps`` (``high_noise_fraction``,
    ``high_noise_start``), ``LossWeight`` (``max_loss_weight``), ``MaskWeight``
    (``mask_loss_weight``, inpainting), ``Replay`` (``replay``, ``replay_pool``), ``Decoys``
    (``decoy_fraction``, ``decoy_start``), ``Anchor`` (``anchor_start``; it holds the
    samples at t >= ``high_noise_start``). The learning rate: ``lr_schedule`` constant,
    cosine (to ``final_lr_ratio`` of it) or phases, over ``schedule_steps`` (by default
    ``max_steps``), after ``warmup_steps``; ``lr_multipliers`` for named modules. Options
    that take a ramp follow ``ldm.training.ramp`` over the run.
    """

    def __init__(self, model, learning_rate=2e-4, warmup_steps=500, p_uncond=0.1,
                 ema_decay=0.999, first_stage_ckpt=None, scale_by_std=True, weight_decay=0.0,
                 init_ckpt=None, init_from=None, lr_schedule="constant", final_lr_ratio=0.1,
                 schedule_steps=None, lr_multipliers=None, high_noise_fraction=0.0,
                 high_noise_start=600, max_loss_weight=1.0, mask_loss_weight=1.0, replay=1,
                 replay_pool=16384, decoy_fraction=0.0, decoy_start=900, anchor_start=None):
        super().__init__()
        if isinstance(lr_schedule, str) and lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"training.lr_schedule must be constant, cosine or a list of "
                             f"[progress, factor] points, not {lr_schedule!r}")
        if not isinstance(lr_schedule, str):
            checked_ramp("lr_schedule", lr_schedule)
        self.lr_schedule, self.final_lr_ratio = lr_schedule, final_lr_ratio
        self.schedule_steps, self.lr_multipliers = schedule_steps, dict(lr_multipliers or {})
        self.timesteps = Timesteps(model.num_timesteps, high_noise_fraction, high_noise_start)
        self.loss_weight = LossWeight(max_loss_weight)
        self.mask_weight = MaskWeight(mask_loss_weight)
        self.replay = Replay(replay, replay_pool)
        self.decoys = Decoys(decoy_fraction, decoy_start)
        self.model = model
        self.inpainting = model.model.conditioning_key == "hybrid"   # a 9-channel UNet
        if self.inpainting and (anchor_start is not None or self.decoys.active()):
            raise ValueError("training.anchor_start and training.decoy_fraction are for "
                             "text-to-image models, not an inpainting model")
        if not self.inpainting and mask_loss_weight != 1.0:
            raise ValueError("training.mask_loss_weight is for an inpainting model")
        if init_from:
            self._init_from_model(init_from)
            scale_by_std = False  # the model's scale_factor comes with its latent space
        self.learning_rate, self.warmup_steps = learning_rate, warmup_steps
        self.p_uncond, self.weight_decay = p_uncond, weight_decay
        self.scale_by_std = scale_by_std
        if first_stage_ckpt:
            self._load_first_stage(first_stage_ckpt)
        self.register_buffer("scale_factor", torch.tensor(float(model.scale_factor)))
        self.register_buffer("scale_set", torch.tensor(not scale_by_std))
        self.model_ema = LitEma(model.model, decay=ema_decay)
        self.cond_ema = (LitEma(model.cond_stage_model, decay=ema_decay)
                         if model.cond_stage_trainable else None)
        self.anchor = (None if anchor_start is None else
                       Anchor(anchor_start, high_noise_start, model.model,
                              model.cond_stage_model))
        if init_ckpt:
            self._init_from(init_ckpt)

    def _init_from(self, path):
        """Start from an earlier stage-2 checkpoint (weights, EMA, scale_factor; a fresh
        optimiser). Parameters the checkpoint lacks must start as no-ops (zero-initialised
        modules added to the config, e.g. the UNet's ``spatial_pos_emb``); they are listed."""
        from ldm.checkpoint import load_state_dict_file
        result = self.load_state_dict(load_state_dict_file(path), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{path} does not fit this config: unexpected keys "
                             f"{result.unexpected_keys[:5]}")
        self.model.scale_factor = float(self.scale_factor)
        log.info("initialised from %s; new: %s", path, result.missing_keys or "none")

    def _init_from_model(self, path):
        """Start from a whole exported model (e.g. the shipped ``models/ldm/shapes``), as
        RunwayML made SD inpainting from SD 1.2: an inpainting UNet's first convolution is
        widened to its input channels, the new ones zero (so training starts from the
        text-to-image model's behaviour), and the rest loads strictly. Comes before the EMA
        copies are made, so they start from these weights too."""
        from ldm.checkpoint import load_model_weights, load_state_dict_file, normalize_keys
        sd = normalize_keys(load_state_dict_file(path))
        key = "model.diffusion_model.input_blocks.0.0.weight"
        own = self.model.state_dict()[key]
        if key in sd and sd[key].shape[1] < own.shape[1]:
            old = sd[key]
            wide = torch.zeros(own.shape, dtype=old.dtype)
            wide[:, :old.shape[1]] = old
            sd[key] = wide
            log.info("widened %s from %d to %d input channels (the new ones zero)", key,
                     old.shape[1], own.shape[1])
        scale = sd.get("scale_factor")
        beside = Path(path).parent / "config.yaml"  # an exported model's scale is in its config
        if scale is None and beside.is_file():
            from omegaconf import OmegaConf
            scale = OmegaConf.load(beside).model.params.get("scale_factor")
        load_model_weights(self.model, sd, source=str(path))
        if scale is not None:
            self.model.scale_factor = float(scale)
        log.info("initialised from the model %s (scale_factor %.5f)", path,
                 self.model.scale_factor)

    def _load_first_stage(self, path):
        from ldm.checkpoint import load_state_dict_file
        sd = load_state_dict_file(path)
        # a stage-1 checkpoint ("model.encoder..." or bare), or a whole model: an exported one
        # ("first_stage_model.encoder...", e.g. the shipped model) or a stage-2 run's
        prefix = next((p for p in ("", "model.", "first_stage_model.", "model.first_stage_model.")
                       if p + "encoder.conv_in.weight" in sd), None)
        if prefix is None:
            raise ValueError(f"{path} holds no autoencoder (no encoder.conv_in.weight under "
                             f"any known prefix): give a stage-1 checkpoint or a whole model")
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
              and k[len(prefix):].split(".")[0] in ("encoder", "decoder", "quant_conv",
                                                     "post_quant_conv")}
        self.model.first_stage_model.load_state_dict(sd, strict=True)
        log.info("first stage loaded from %s", path)

    def train(self, mode=True):
        super().train(mode)
        self.model.first_stage_model.eval()  # frozen: keep it in eval mode
        return self

    @torch.no_grad()
    def encode(self, batch):
        x = images_from_batch(batch, self.model.first_stage_key)
        z = self.model.encode_first_stage(x).sample()
        if not self.scale_set:
            var = z.flatten().var()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(var)   # DDP: one scale for all processes
                var = var / torch.distributed.get_world_size()
            self.scale_factor.fill_(1.0 / var.sqrt())
            self.scale_set.fill_(True)
            log.info("scale_factor set to %.5f from the first batch", self.scale_factor.item())
        self.model.scale_factor = self.scale_factor.item()
        return z * self.scale_factor

    @torch.no_grad()
    def concat(self, batch):
        """An inpainting model's extra input: the mask at latent size (nearest) and the
        masked image's latents (posterior mean, as at inference)."""
        mask = batch["mask"].float()[:, None]
        f = self.model.latent_downsampling_factor
        small = F.interpolate(mask, size=(mask.shape[-2] // f, mask.shape[-1] // f),
                              mode="nearest")
        masked = images_from_batch(batch, "masked_image")
        z = self.model.encode_first_stage(masked).mode() * self.scale_factor
        return self.model.inpainting_concat(small, z)

    def progress(self):
        """Fraction of the schedule done (0 outside a fit with a step limit)."""
        total = self.schedule_length()
        return self.global_step / total if total else 0.0

    def schedule_length(self):
        """``schedule_steps``, else the trainer's ``max_steps``; None if neither is set."""
        if self.schedule_steps:
            return int(self.schedule_steps)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.max_steps or trainer.max_steps < 0:
            return None
        return trainer.max_steps

    def _loss(self, batch, drop_captions):
        """The batch's loss; ``drop_captions`` (training steps) also replays, drops captions
        for guidance, and applies the decoys and the anchor."""
        progress = self.progress()
        z = self.encode(batch)
        concat = self.concat(batch) if self.inpainting else None
        captions = list(batch[self.model.cond_stage_key])
        if drop_captions:
            z, captions, concat = self.replay(z, captions, concat)
            keep = torch.rand(len(captions)) >= self.p_uncond
            captions = [c if k else "" for c, k in zip(captions, keep)]
        cond = self.model.get_learned_conditioning(captions)
        t = self.timesteps(z.shape[0], z.device, progress)
        noise = torch.randn_like(z)
        source = self.decoys(z, t, progress) if drop_captions else z
        x_t = self.model.q_sample(source, t, noise)
        eps = Decoys.noise_target(self.model, z, source, t, noise)
        output = self.model.apply_model(x_t, t, cond, *([] if concat is None else [concat]))
        target = self.model.training_target(z, eps, t)
        if drop_captions and self.anchor is not None:
            target = self.anchor(target, x_t, t, captions, progress, self._copy_ema)
        mask = None if concat is None else concat[:, :1]   # inpainting_concat: mask first
        error = self.mask_weight((output - target).square(), mask, progress)
        weight = self.loss_weight(t, self.model.alphas_cumprod, self.model.parameterization,
                                  progress)
        return (error * weight).mean()

    def _copy_ema(self, unet, text):
        """The EMA weights into ``unet`` and ``text`` (the live text encoder's if it has no
        EMA, i.e. it is frozen)."""
        self.model_ema.copy_to(unet)
        if self.cond_ema is not None:
            self.cond_ema.copy_to(text)
        else:
            text.load_state_dict(self.model.cond_stage_model.state_dict())
        log.info("anchor set from the EMA weights at step %d", self.global_step)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, drop_captions=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_fit_start(self):
        self.reseed_for_rank(self.trainer.world_size, self.global_rank)

    @staticmethod
    def reseed_for_rank(world_size, rank):
        """DDP: every process was seeded alike; their noise and timesteps must differ."""
        if world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1000003 * rank)

    def on_train_batch_end(self, *args):
        self.model_ema(self.model.model)
        if self.cond_ema is not None:
            self.cond_ema(self.model.cond_stage_model)

    def on_load_checkpoint(self, checkpoint):
        self.model.scale_factor = float(checkpoint["state_dict"]["scale_factor"])
        Anchor.fill_missing(self, checkpoint["state_dict"])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch, drop_captions=False))

    def configure_optimizers(self):
        named = [("model." + k, p) for k, p in self.model.model.named_parameters()]
        if self.model.cond_stage_trainable:
            named += [("cond_stage_model." + k, p)
                      for k, p in self.model.cond_stage_model.named_parameters()]
        params = param_groups(named, self.learning_rate, self.lr_multipliers)
        # the fused kernel: a third of the optimiser's time on a CPU, the same update
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay,
                                fused=self.device.type in ("cpu", "cuda"))
        phases = None if isinstance(self.lr_schedule, str) else self.lr_schedule
        total = self.schedule_length() if self.lr_schedule != "constant" else None
        if self.lr_schedule != "constant" and not total:
            raise ValueError("a cosine or phased lr_schedule needs max_steps "
                             "(or training.schedule_steps)")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(self.warmup_steps, total, self.final_lr_ratio, phases))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def ema_state_dict(self):
        """The model's state_dict with EMA weights in place of the trained ones."""
        model = self.model
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        self.model_ema.copy_to(model.model)
        if self.cond_ema is not None:
            self.cond_ema.copy_to(model.cond_stage_model)
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(saved)
        return ema


class ConsistencyTrainer(DiffusionTrainer):
    """Stage 3: a few-step model distilled from an exported one (``distill_from``: the
    shipped ``models/ldm/shapes`` or its inpainting model) by latent consistency
    distillation (``ldm.training.ConsistencyDistillation``).

    The student's config is the teacher's with ``time_cond_proj_dim`` (the guidance scale
    as an embedding, as LCM_Dreamshaper's). It starts as the teacher: the same weights, the
    embedding's projection zero, so its first predictions are the teacher's own; the text
    encoder and autoencoder stay the teacher's, frozen, and only the UNet trains. The
    target network is an EMA of the student (``target_decay``, 0.95 as LCM); the exported
    weights are the slower EMA (``ema_decay``), as in stage 2. ``guidance``: the range of
    scales drawn for the teacher (and given to the student); ``original_steps``: the
    teacher's DDIM grid (50: one DDIM step skips 20 timesteps); ``p_uncond``: 0 (the
    student never runs unguided). ``teacher_config``: the teacher's config, by default
    ``config.yaml`` beside ``distill_from``."""

    def __init__(self, model, distill_from, guidance=(2.0, 8.0), original_steps=50,
                 huber_c=0.001, target_decay=0.95, teacher_config=None, **params):
        import copy
        from ldm.pipeline import load_model
        unet = model.model.diffusion_model
        if not getattr(unet, "time_cond_proj_dim", None):
            raise ValueError("a consistency student's UNet needs time_cond_proj_dim (the "
                             "guidance embedding) in its config")
        if model.cond_stage_trainable:
            raise ValueError("a consistency student keeps the teacher's text encoder: set "
                             "cond_stage_trainable: false")
        for key in ("init_from", "init_ckpt", "first_stage_ckpt", "anchor_start"):
            if params.get(key):
                raise ValueError(f"training.{key} does not go with training.distill_from")
        config = Path(teacher_config or Path(distill_from).parent / "config.yaml")
        teacher = load_model(distill_from, config).eval().requires_grad_(False)
        if teacher.parameterization != model.parameterization:
            raise ValueError(f"the teacher predicts {teacher.parameterization}, the student's "
                             f"config {model.parameterization}: they must agree")
        if not torch.allclose(teacher.alphas_cumprod, model.alphas_cumprod):
            raise ValueError("the teacher's noise schedule differs from the student config's")
        own = model.state_dict()
        start = {k: v for k, v in teacher.state_dict().items() if k in own}
        new = sorted(set(own) - set(start))
        if any("cond_proj" not in k for k in new):
            raise ValueError(f"the student's config does not fit the teacher {distill_from}: "
                             f"new weights {new[:3]}")
        for k in new:
            start[k] = torch.zeros_like(own[k])   # the embedding starts as nothing
        model.load_state_dict(start, strict=True)
        model.scale_factor = teacher.scale_factor
        params.setdefault("p_uncond", 0.0)
        params["scale_by_std"] = False   # the teacher's latent space and scale
        super().__init__(model, **params)
        self.distill = ConsistencyDistillation(model.alphas_cumprod, guidance, original_steps,
                                               huber_c, target_decay)
        self.teacher = teacher.model            # its UNet (the wrapper), frozen
        self.target_net = copy.deepcopy(model.model).requires_grad_(False)
        log.info("distilling %s: guidance %s, %d-step DDIM grid", distill_from,
                 list(guidance), original_steps)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        self.target_net.eval()
        return self

    def _loss(self, batch, drop_captions):
        from ldm.modules.diffusionmodules.util import guidance_embedding
        model, cd = self.model, self.distill
        z = self.encode(batch)
        concat = self.concat(batch) if self.inpainting else None
        captions = list(batch[model.cond_stage_key])
        if drop_captions:
            z, captions, concat = self.replay(z, captions, concat)
            if self.p_uncond:
                keep = torch.rand(len(captions)) >= self.p_uncond
                captions = [c if k else "" for c, k in zip(captions, keep)]
        n = z.shape[0]
        t, s, scale = cd.draw(n, z.device)
        extra = {} if concat is None else {"concat": concat}
        with torch.no_grad():
            cond = model.get_learned_conditioning(captions)
            uncond = model.get_learned_conditioning([""] * n)
            w = guidance_embedding(scale.cpu(), model.model.diffusion_model.time_cond_proj_dim)
            w = w.to(z.device)
            x_t = model.q_sample(z, t, torch.randn_like(z))
            both = {"crossattn": torch.cat([uncond, cond]),
                    **{k: torch.cat([v, v]) for k, v in extra.items()}}
            out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both).float()
            eps_u, eps_c = model.eps_from_output(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                                 out).chunk(2)
            eps = eps_u + scale.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x_s = cd.ddim_step(x_t, t, s, eps)
            mine = {"crossattn": cond, "guidance": w, **extra}
            out_s = self.target_net(x_s, s, mine).float()
            f_target = cd.f(x_s, s, model.eps_from_output(x_s, s, out_s))
        out_t = model.model(x_t, t, mine).float()
        f_student = cd.f(x_t, t, model.eps_from_output(x_t, t, out_t))
        return cd.loss(f_student, f_target)

    def on_train_batch_end(self, *args):
        super().on_train_batch_end(*args)
        self.distill.update_target(self.target_net, self.model.model)


# keys of a training checkpoint that are training state, not the model
TRAINING_ONLY = ("anchor.", "anchor_set", "teacher.", "target_net.")


def trainer_for(model, **params):
    """The Lightning wrapper for a plain model built from ``config.model``."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    if isinstance(model, AutoencoderKL):
        return AutoencoderTrainer(model, **params)
    if isinstance(model, LatentDiffusion) and params.get("distill_from"):
        return ConsistencyTrainer(model, **params)
    if isinstance(model, LatentDiffusion):
        return DiffusionTrainer(model, **params)
    raise ValueError(f"no trainer for {type(model).__name__}")


class _ResumedTotal:
    """A progress bar's total for a run resumed mid-epoch. Lightning counts the bar from the
    restored step of the epoch but sets its total to the steps left, so a run resumed at
    step 2,250 of 4,000 ran to "4000/1749". Here the total counts the steps already done in
    the epoch too, and that run ends at 4000/4000."""

    def steps_done_in_epoch(self):
        """Steps of the current epoch done, counting those before a resume."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    @property
    def total_train_batches(self):
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            left = trainer.max_steps - trainer.global_step
            total = min(total, left + self.steps_done_in_epoch())
        return total


class RichStepBar(_ResumedTotal, pl.callbacks.RichProgressBar):
    def _get_train_description(self, current_epoch):   # not "Epoch 0/-2" in a run of steps
        if self.trainer.max_epochs == -1:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)


class TQDMStepBar(_ResumedTotal, pl.callbacks.TQDMProgressBar):
    def on_train_start(self, *args):
        super().on_train_start(*args)   # a mid-epoch resume skips on_train_epoch_start
        bar = self.train_progress_bar
        bar.total, bar.n = self.total_train_batches, self.steps_done_in_epoch()


def progress_bar():
    """On a terminal, Lightning's default bar (Rich if installed, else tqdm), counting a
    resumed run right; for a log file or a pipe, plain lines (``LogLines``)."""
    import sys
    from pytorch_lightning.utilities.imports import _RICH_AVAILABLE
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return LogLines()
    return RichStepBar() if _RICH_AVAILABLE else TQDMStepBar()


class LogLines(pl.Callback):
    """Progress as plain lines, for a log file or a pipe, where a bar is one endless line
    of carriage returns: the step, the rate, the time left and the latest losses, at every
    tenth of the run and at least once a minute."""

    def __init__(self, stream=None, every_seconds=60.0):
        import sys
        self.stream = stream or sys.stderr
        self.every_seconds = every_seconds

    def on_train_start(self, trainer, pl_module):
        import time
        self.total = (trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                      else trainer.num_training_batches * max(trainer.max_epochs or 1, 1))
        self.first = trainer.global_step
        self.start = self.last = time.monotonic()
        self.tenth = max(1, (self.total - self.first) // 10)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time
        step, now = trainer.global_step, time.monotonic()
        if not ((step - self.first) % self.tenth == 0 or step >= self.total
                or now - self.last >= self.every_seconds):
            return
        self.last = now
        rate = (step - self.first) / max(now - self.start, 1e-9)
        left = (self.total - step) / rate if rate > 0 else 0.0
        losses = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(
            trainer.callback_metrics.items()) if k.startswith("train/"))
        print(f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%), "
              f"{rate:.2f} steps/s, {left:.0f} s left" + (f", {losses}" if losses else ""),
              file=self.stream, flush=True)
