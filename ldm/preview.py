"""Cheap live previews of latents while sampling runs.

``LatentPreview`` maps latent channels to RGB with one linear map (A1111's "Approx cheap"
preview), fitted once per model by least squares on what its own autoencoder makes of a few
smooth random colour images, so it serves every latent space (SD 1/2's 4 channels, SDXL's,
the built-in model's) without a table per family. A preview costs a small matrix product,
not a decode.
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
        buffer = io.BytesIO()
        self.image(latents).save(buffer, format="PNG")
        return buffer.getvalue()
