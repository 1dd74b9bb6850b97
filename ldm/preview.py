"""Live previews of latents while sampling runs.

``LatentPreview`` maps latent channels to RGB with one linear map (A1111's "Approx cheap"
preview), fitted once per model by least squares on what its own autoencoder makes of a few
smooth random colour images, so it serves every latent space (SD 1/2's 4 channels, SDXL's,
the built-in model's) without a table per family. A preview costs a small matrix product,
not a decode. ``TinyPreview`` decodes with a tiny autoencoder (TAESD) instead: a real
small picture (A1111's "TAESD" preview). ``PreviewFile`` keeps one on disk for the scripts'
``--preview``.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class LatentPreview:
    def __init__(self, pipe, count=8, seed=0):
        f = pipe.factor
        size = 16 * f
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(count, 3, 4, 4, generator=g) * 2 - 1
        x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            z = torch.cat([pipe.encode_pixels(x[i:i + 1]) for i in range(count)]).float().cpu()
        target = F.avg_pool2d(x, f)
        c = z.shape[1]
        zs = z.permute(0, 2, 3, 1).reshape(-1, c)
        zs = torch.cat([zs, torch.ones(len(zs), 1)], 1).double()
        ts = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
        self.weights = torch.linalg.lstsq(zs, ts).solution.float()   # [C + 1, 3]
        self.factor = f

    def image(self, latents):
        """[1, C, h, w] (or [C, h, w]) latents -> an RGB PIL image of the latents' size
        times the factor."""
        z = latents.reshape(-1, *latents.shape[-3:])[0].float().cpu()
        c, h, w = z.shape
        flat = torch.cat([z.permute(1, 2, 0).reshape(-1, c), torch.ones(h * w, 1)], 1)
        rgb = (flat @ self.weights).reshape(h, w, 3).clamp(-1, 1)
        a = ((rgb + 1) * 127.5).round().to(torch.uint8).numpy()
        return Image.fromarray(np.ascontiguousarray(a), "RGB").resize(
            (w * self.factor, h * self.factor), Image.BILINEAR)

    def png(self, latents):
        return png_bytes(self.image(latents))


class TinyPreview:
    """Previews decoded by a tiny autoencoder (TAESD: ``ldm.models.tiny_autoencoder``), a
    faithful small picture for about the cost of one UNet block."""

    def __init__(self, tiny):
        self.tiny = tiny

    def image(self, latents):
        from ldm.image_io import tensor_to_pil
        z = latents.reshape(-1, *latents.shape[-3:])[:1]
        param = next(self.tiny.decoder.parameters())
        with torch.no_grad():
            x = self.tiny.decode(z.to(param.device, param.dtype) / self.tiny.scale
                                 + self.tiny.shift)
        return tensor_to_pil(x.float().cpu())[0]

    def png(self, latents):
        return png_bytes(self.image(latents))


class FullPreview:
    """A1111's "Full" live preview: the model's own autoencoder decodes the estimate."""

    def __init__(self, pipe):
        self.pipe = pipe

    def image(self, latents):
        return self.pipe.decode(latents[:1].to(self.pipe.device))[0]

    def png(self, latents):
        return png_bytes(self.image(latents))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def previewer(pipe, tiny_path=None):
    """The preview a run of ``pipe`` shows: a TAESD decoder (``tiny_path``, or the
    pipeline's own autoencoder when it is one), else the cheap linear map."""
    from ldm.models.tiny_autoencoder import TinyAutoencoder
    from ldm.pipeline import read_tiny_vae
    own = pipe.model.first_stage_model
    if tiny_path is not None:
        found = read_tiny_vae(pipe.model, tiny_path, "--preview_vae")
        if found is None:
            from ldm.checkpoint import CheckpointError
            raise CheckpointError(f"--preview_vae {tiny_path} is not a tiny autoencoder "
                                  "(TAESD: taesd_decoder.pth, taesdxl_decoder.pth...)")
        return TinyPreview(found[0].to(pipe.device))
    if isinstance(own, TinyAutoencoder):
        return TinyPreview(own)
    return LatentPreview(pipe)


class PreviewFile:
    """A live preview as a file: every ``every`` steps the first image of the batch's
    current estimate (``pred_x0``) written to ``path``, replaced whole (a viewer that
    reloads never reads half a PNG); removed when the run ends."""

    def __init__(self, preview, path, every):
        self.preview, self.path, self.every = preview, path, every
        self.steps = 0
        # the folders a first preview makes, removed again if nothing else lands in them
        self.made = [d for d in [path.parent, *path.parent.parents] if not d.exists()]

    def __call__(self, x0):
        self.steps += 1
        if self.steps % self.every:
            return
        import os
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.preview.image(x0).save(tmp, format="PNG")
        os.replace(tmp, self.path)

    def close(self):
        for p in (self.path, self.path.with_name(f".{self.path.name}.tmp")):
            p.unlink(missing_ok=True)
        for folder in self.made:   # a run stopped before its first image leaves nothing
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
