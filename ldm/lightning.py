"""Training with PyTorch Lightning, kept apart from the inference core.

``main.py`` builds ``config.model`` (a plain ``AutoencoderKL`` or ``LatentDiffusion``) and wraps
it here: ``AutoencoderTrainer`` for stage 1, ``DiffusionTrainer`` for stage 2. The wrapped
model is the attribute ``model``; the Lightning checkpoint's ``state_dict`` therefore holds
``model.<official keys>`` plus EMA shadows, and ``scripts/export_model.py`` turns it into an
inference checkpoint in the official layout.
"""
import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


def images_from_batch(batch, key="image"):
    """CompVis data convention: ``batch[key]`` is B x H x W x C in [-1, 1]."""
    x = batch[key]
    if x.dim() == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).contiguous().float()


def warmup_lambda(warmup_steps, total_steps=None, final_ratio=1.0, phases=None):
    """Learning-rate factor: linear warm-up to 1, then constant, or, given ``total_steps``,
    a cosine from 1 down to ``final_ratio`` at ``total_steps``, or, given ``phases`` (and
    ``total_steps``), the factor ``ramp(phases, step / total_steps)`` after the warm-up."""
    def factor(step):
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        if phases is not None:
            return warm * ramp(phases, step / max(1, total_steps))
        if step < warmup_steps or total_steps is None:
            return warm
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def ramp(value, progress):
    """A training option that is a number; a ``[start, end]`` pair followed linearly over the
    run (``progress`` from 0 to 1); or a list of ``[progress, value]`` points, followed
    piecewise linearly and held before the first and after the last (phases: e.g.
    ``[[0, 0], [0.4, 0], [0.45, 0.5], [1, 0.1]]``)."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, (int, float)) for v in value):
        value = [[0, value[0]], [1, value[1]]]
    points, values = zip(*sorted((float(p), float(v)) for p, v in value))
    return float(np.interp(progress, points, values))


class DataModuleFromConfig(pl.LightningDataModule):
    """CompVis' data section: ``train`` / ``validation`` dataset configs and a batch size."""

    def __init__(self, batch_size, train, validation=None, num_workers=0):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_config, self.validation_config = train, validation

    def _loader(self, config, shuffle):
        dataset = instantiate_from_config(config)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, drop_last=shuffle,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_config, shuffle=True)

    def val_dataloader(self):
        if self.validation_config is None:
            return []
        return self._loader(self.validation_config, shuffle=False)


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
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(self.warmup_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class DiffusionTrainer(pl.LightningModule):
    """Stage 2: the denoising loss (Ho et al. 2020, eq. 14) in the autoencoder's latent space.

    The autoencoder is frozen and loaded from ``first_stage_ckpt``; the UNet and, when
    ``cond_stage_trainable``, the text encoder are trained, with EMA copies of both. Captions
    are replaced by "" with probability ``p_uncond`` so that classifier-free guidance works
    (Ho & Salimans 2022). ``scale_by_std`` sets ``scale_factor`` to 1/std of the first
    batch's latents (CompVis' rule), saved in the checkpoint.

    On a CPU, rendering and encoding the images costs about a third of a step. With
    ``replay`` r > 1 each step encodes the loader's batch of n fresh images, keeps their
    latents and captions in a pool of the last ``replay_pool`` ones, and trains on r * n
    samples: the fresh n plus (r - 1) * n drawn from the pool (each latent is used about r
    times, while the pool turns over every ``replay_pool / n`` steps). The pool is not
    checkpointed: after ``--resume`` it refills from fresh batches.

    ``high_noise_fraction`` and ``max_loss_weight`` may be ``[start, end]`` pairs, followed
    linearly over the run, or lists of ``[progress, value]`` points (see ``ramp``);
    ``lr_schedule: cosine`` decays the learning rate after the warm-up to ``final_lr_ratio``
    of it at the run's end; a list of ``[progress, factor]`` points multiplies it by
    ``ramp(points, progress)`` instead (phases of the run at different rates). The run's
    length for these schedules is ``schedule_steps``, by default ``max_steps``; a run may be
    laid out over more steps than it takes. ``decoy_fraction`` (see ``decoys``) may ramp too.

    ``anchor_start`` (a progress from 0 to 1; off by default) freezes a copy of the EMA UNet
    and text encoder at that point of the run; from then on the samples with t in
    ``anchor_timesteps`` ([low, high), by default [high_noise_start, T)) are trained towards
    that copy's prediction instead of the noise (see ``anchored_targets``).
    """

    def __init__(self, model, learning_rate=2e-4, warmup_steps=500, p_uncond=0.1,
                 ema_decay=0.999, first_stage_ckpt=None, scale_by_std=True, weight_decay=0.0,
                 init_ckpt=None, high_noise_fraction=0.0, high_noise_start=600,
                 max_loss_weight=1.0, lr_schedule="constant", final_lr_ratio=0.1, replay=1,
                 replay_pool=16384, schedule_steps=None, decoy_fraction=0.0, decoy_start=900,
                 top_loss_weight=None, anchor_start=None, anchor_timesteps=None, init_from=None):
        super().__init__()
        if isinstance(lr_schedule, str) and lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"training.lr_schedule must be constant, cosine or a list of "
                             f"[progress, factor] points, not {lr_schedule!r}")
        ramped = {"high_noise_fraction": high_noise_fraction, "max_loss_weight": max_loss_weight,
                  "decoy_fraction": decoy_fraction}
        if top_loss_weight is not None:
            ramped["top_loss_weight"] = top_loss_weight
        if not isinstance(lr_schedule, str):
            ramped["lr_schedule"] = lr_schedule
        for name, value in ramped.items():   # a malformed one fails here, not mid-run
            try:
                ramp(value, 0.0)
            except (TypeError, ValueError):
                raise ValueError(f"training.{name} must be a number, a [start, end] pair or a "
                                 f"list of [progress, value] points, not {value!r}") from None
        self.decoy_fraction, self.decoy_start = decoy_fraction, int(decoy_start)
        self.lr_schedule, self.final_lr_ratio = lr_schedule, final_lr_ratio
        self.schedule_steps = schedule_steps
        self.replay, self.replay_pool = int(replay), int(replay_pool)
        self._pool = None
        self.max_loss_weight, self.top_loss_weight = max_loss_weight, top_loss_weight
        self.high_noise_fraction, self.high_noise_start = high_noise_fraction, high_noise_start
        self.model = model
        self.inpainting = hasattr(model, "inpainting_concat")
        if self.inpainting and (anchor_start is not None or ramp(decoy_fraction, 0.0) > 0
                                or ramp(decoy_fraction, 1.0) > 0):
            raise ValueError("training.anchor_start and training.decoy_fraction are for "
                             "text-to-image models, not an inpainting model")
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
        self.anchor_start = anchor_start
        self.anchor_timesteps = ([int(high_noise_start), model.num_timesteps]
                                 if anchor_timesteps is None else [int(v) for v in anchor_timesteps])
        if len(self.anchor_timesteps) != 2:
            raise ValueError(f"training.anchor_timesteps is [low, high), not {anchor_timesteps!r}")
        if anchor_start is not None:
            if not 0 <= float(anchor_start) <= 1:
                raise ValueError(f"training.anchor_start is a progress from 0 to 1, "
                                 f"not {anchor_start!r}")
            self.anchor = torch.nn.ModuleDict({"unet": copy.deepcopy(model.model),
                                               "text": copy.deepcopy(model.cond_stage_model)})
            self.anchor.requires_grad_(False).eval()
            self.register_buffer("anchor_set", torch.tensor(False))
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
        if self.anchor_start is not None:
            self.anchor.eval()
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

    def replayed(self, z, captions, concat=None):
        """The fresh latents and captions (and an inpainting model's concat input) plus
        (replay - 1) times as many from the pool."""
        n, capacity = z.shape[0], self.replay_pool
        if self._pool is None:  # a ring buffer
            self._pool = {"z": z.new_empty((capacity, *z.shape[1:])),
                          "captions": [""] * capacity, "pushed": 0, "size": 0}
            if concat is not None:
                self._pool["concat"] = concat.new_empty((capacity, *concat.shape[1:]))
        pool = self._pool
        slots = [(pool["pushed"] + i) % capacity for i in range(n)]
        pool["z"][slots] = z
        if concat is not None:
            pool["concat"][slots] = concat
        for slot, caption in zip(slots, captions):
            pool["captions"][slot] = caption
        pool["pushed"] += n
        pool["size"] = min(pool["pushed"], capacity)
        idx = torch.randint(0, pool["size"], ((self.replay - 1) * n,))
        return (torch.cat([z, pool["z"][idx]]),
                captions + [pool["captions"][i] for i in idx.tolist()],
                None if concat is None else torch.cat([concat, pool["concat"][idx]]))

    def _loss(self, batch, drop_captions):
        z = self.encode(batch)
        concat = self.concat(batch) if self.inpainting else None
        captions = list(batch[self.model.cond_stage_key])
        if drop_captions and self.replay > 1:  # training steps only
            z, captions, concat = self.replayed(z, captions, concat)
        if drop_captions:
            keep = torch.rand(len(captions)) >= self.p_uncond
            captions = [c if k else "" for c, k in zip(captions, keep)]
        cond = self.model.get_learned_conditioning(captions)
        t = self.sample_timesteps(z.shape[0], z.device)
        noise = torch.randn_like(z)
        source = self.decoys(z, t) if drop_captions else z
        x_t = self.model.q_sample(source, t, noise)
        eps = noise   # what takes z to x_t: with a decoy, noise plus the decoy's difference
        if source is not z:
            m = self.model
            eps = noise + (m._at(m.sqrt_alphas_cumprod, t, z)
                           / m._at(m.sqrt_one_minus_alphas_cumprod, t, z)) * (source - z)
        output = self.model.apply_model(x_t, t, cond, *([] if concat is None else [concat]))
        target = eps if self.model.parameterization == "eps" else self.model.get_v(z, eps, t)
        if drop_captions:
            target = self.anchored_targets(target, x_t, t, captions)
        error = (output - target).square().mean((1, 2, 3))
        return (error * self.loss_weight(t)).mean()

    def decoys(self, z, t):
        """``z`` with, for a ``decoy_fraction`` (a number or a ramp) of the samples at
        t >= ``decoy_start``, another sample's latent in its place: the noised input then
        shows the wrong layout while the target stays this sample's.

        SD's schedule leaves sqrt(alpha_bar) = 0.068 of the image in x_t at t = 999, enough
        for a model to read where things are from its input rather than from the prompt
        (a probe on the shapes model: at t = 999 its x0 error is half with the image in the
        noise than with pure noise). Sampling starts from pure noise, where that layout is
        random, so such a model puts things wherever the noise suggests. Decoys teach it that
        at the top of the schedule the input's layout is unreliable and the words are not."""
        p = ramp(self.decoy_fraction, self.progress())
        if p <= 0:
            return z
        chosen = (t >= self.decoy_start) & (torch.rand(t.shape, device=t.device) < p)
        if not chosen.any():
            return z
        other = torch.roll(z, 1, 0)   # the previous sample of the batch
        return torch.where(chosen.view(-1, 1, 1, 1), other, z)

    @torch.no_grad()
    def anchored_targets(self, target, x_t, t, captions):
        """``target`` with, once the anchor is set (``anchor_start``), the prediction of the
        frozen anchor in place of the samples with t in ``anchor_timesteps``.

        Two skills live at different ends of the schedule: where the prompt puts things is
        decided at the top, what they look like below it. Training one at a learning rate that
        teaches it quickly undoes the other, unless that other's loss is weighted so heavily
        that it crowds the first out: its data loss is mostly the unpredictable detail of
        an image seen through noise. The anchor's prediction is that loss's target with the
        noise averaged out: matching it costs little gradient once matched, and holds what
        the anchor knew on its part of the schedule while the rest learns."""
        if self.anchor_start is None:
            return target
        if not self.anchor_set:
            if self.progress() < float(self.anchor_start):
                return target
            self.model_ema.copy_to(self.anchor["unet"])
            if self.cond_ema is not None:
                self.cond_ema.copy_to(self.anchor["text"])
            else:
                self.anchor["text"].load_state_dict(self.model.cond_stage_model.state_dict())
            self.anchor_set.fill_(True)
            log.info("anchor set from the EMA weights at step %d", self.global_step)
        low, high = self.anchor_timesteps
        chosen = ((t >= low) & (t < high)).nonzero().flatten()
        if len(chosen) == 0:
            return target
        cond = self.anchor["text"].encode([captions[i] for i in chosen.tolist()])
        target = target.clone()
        target[chosen] = self.anchor["unet"](x_t[chosen], t[chosen], c_crossattn=cond)
        return target

    def on_load_checkpoint_anchor(self, state_dict):
        """A checkpoint from before the anchor existed (or a run without one) resumes with
        the anchor unset: its keys are filled from this module so loading stays strict."""
        if self.anchor_start is None:
            return
        own = self.state_dict()
        for key in own:
            if (key.startswith("anchor.") or key == "anchor_set") and key not in state_dict:
                state_dict[key] = own[key] if key != "anchor_set" else torch.tensor(False)

    def loss_weight(self, t):
        """Per-sample weight of the noise-prediction loss: 1 (Ho et al.), or, with
        ``max_loss_weight`` > 1, the weight that makes it the v-prediction loss,
        (1 + SNR) / SNR, capped there: high-noise steps, where the layout is decided, count
        up to that many times more (cf. Min-SNR weighting, Hang et al. 2023).

        ``top_loss_weight``, if given, is the cap for t >= ``high_noise_start`` instead, so
        that the top can count fully while the rest keeps a low cap (the details)."""
        cap = ramp(self.max_loss_weight, self.progress())
        top = cap if self.top_loss_weight is None else ramp(self.top_loss_weight,
                                                            self.progress())
        if max(cap, top) <= 1 or self.model.parameterization != "eps":
            return torch.ones_like(t, dtype=torch.float32)
        alpha = self.model.alphas_cumprod.to(t.device)[t].float()
        caps = torch.where(t >= self.high_noise_start, top, cap).to(alpha.dtype)
        return torch.minimum(1 / alpha, caps).clamp(min=1)

    def sample_timesteps(self, n, device):
        """Uniform over [0, T), except that a ``high_noise_fraction`` of the batch is drawn
        from [high_noise_start, T). Where things go in the image is settled at high noise,
        where the noise-prediction loss carries little signal; more of those steps teach a
        prompt's spatial words ("on the left") sooner."""
        T = self.model.num_timesteps
        t = torch.randint(0, T, (n,), device=device)
        k = int(round(ramp(self.high_noise_fraction, self.progress()) * n))
        if k:
            t[:k] = torch.randint(self.high_noise_start, T, (k,), device=device)
        return t

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
        self.on_load_checkpoint_anchor(checkpoint["state_dict"])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch, drop_captions=False))

    def configure_optimizers(self):
        params = list(self.model.model.parameters())
        if self.model.cond_stage_trainable:
            params += list(self.model.cond_stage_model.parameters())
        # the fused kernel: a third of the optimiser's time on a CPU, the same update
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay,
                                fused=self.device.type in ("cpu", "cuda"))
        phases = None if isinstance(self.lr_schedule, str) else self.lr_schedule
        total = self.schedule_length() if self.lr_schedule != "constant" else None
        if self.lr_schedule != "constant" and not total:
            raise ValueError("a cosine or phased lr_schedule needs max_steps "
                             "(or training.schedule_steps)")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_lambda(self.warmup_steps, total, self.final_lr_ratio, phases))
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


def trainer_for(model, **params):
    """The Lightning wrapper for a plain model built from ``config.model``."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    if isinstance(model, AutoencoderKL):
        return AutoencoderTrainer(model, **params)
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
    """Lightning's default bar (Rich if installed, else tqdm), counting a resumed run right."""
    from pytorch_lightning.utilities.imports import _RICH_AVAILABLE
    return RichStepBar() if _RICH_AVAILABLE else TQDMStepBar()
