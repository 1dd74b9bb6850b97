"""Writes tests/data/upscalers.safetensors: tiny pixel upscalers with random weights in
their published key layouts, an input, and the output spandrel (the library ComfyUI loads
them with) computes for it. tests/test_upscalers.py checks ``ldm.modules.sr`` against
these outputs. spandrel cannot be a test dependency here (it needs a CUDA build of
torchvision for torch 2.13), so its outputs are recorded once:

    pip install --no-deps --target /tmp/spd spandrel==0.4.2 einops
    python tests/upscaler_reference.py /tmp/spd

torchvision is replaced by a stub module: the two architectures here do not use it (only
LaMa and RestoreFormer import it when spandrel is imported).
"""
import sys
import types
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "data" / "upscalers.safetensors"


def spandrel_from(path):
    sys.path.insert(0, str(path))
    tv, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                 "torchvision.transforms.functional"))
    fn.InterpolationMode, fn.rotate, fn.normalize = object, None, None
    tv.transforms, tr.functional = tr, fn
    sys.modules.update({m.__name__: m for m in (tv, tr, fn)})
    import spandrel
    return spandrel


def randomized(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan ** 0.5 if p.dim() > 1
                                                         else 0.1))
    return net.half().float().eval()   # stored in float16: the reference from those values


def main(argv):
    spandrel = spandrel_from(argv[0] if argv else "/tmp/spd")
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact
    from spandrel.architectures.ESRGAN import ESRGAN
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ldm.modules.sr import esrgan_keys
    cases = {   # name: (state dict in the layout people publish, input side)
        "esrgan_original_x4": ESRGAN(num_filters=16, num_blocks=2, scale=4),   # gc is 32
        "esrgan_original_x8": ESRGAN(num_filters=8, num_blocks=1, scale=8),
        "esrgan_basicsr_x2": ESRGAN(num_filters=8, num_blocks=1, scale=2, shuffle_factor=2),
        "compact_x4": SRVGGNetCompact(num_feat=8, num_conv=3, upscale=4),
        "compact_x2": SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2),
    }
    out = {}
    g = torch.Generator().manual_seed(0)
    for i, (name, net) in enumerate(cases.items()):
        sd = randomized(net, i).state_dict()
        if "basicsr" in name:   # Real-ESRGAN's x2 files use BasicSR's names
            sd = esrgan_keys(sd)
        model = spandrel.ModelLoader().load_from_state_dict(dict(sd)).model.eval()
        x = torch.rand(1, 3, 12, 16, generator=g)
        with torch.no_grad():
            y = model(x)
        out.update({f"{name}/weights/{k}": v.half().contiguous() for k, v in sd.items()})
        out[f"{name}/input"], out[f"{name}/output"] = x, y.contiguous()
        print(name, type(model).__name__, tuple(y.shape), f"{float(y.std()):.3f}")
    from safetensors.torch import save_file
    save_file(out, OUT, metadata={"spandrel": getattr(spandrel, "__version__", "?")})
    print("wrote", OUT)


if __name__ == "__main__":
    main(sys.argv[1:])
