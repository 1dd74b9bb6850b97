"""Time one SD v1 UNet step, ours vs diffusers' UNet2DConditionModel, on identical weights.

    python scripts/benchmark_unet.py                 # 256x256, batch 2 (guidance), fp32
    python scripts/benchmark_unet.py --size 512 --repeats 3

Random SD v1-size weights are built once in our layout, converted with diffusers' own
converter of the original layout, and both models run the same inputs, alternating, in the
same process. Prints the median seconds per step of each, their ratio, and the max relative
difference of the outputs.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side (latent = size / 8)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels_last", action="store_true",
                   help="also time ours with channels-last tensors")
    args = p.parse_args()

    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    from omegaconf import OmegaConf

    from ldm.compare import time_alternating
    from ldm.util import instantiate_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" /
                            "stable-diffusion" / "v1-inference.yaml")
    ours = instantiate_from_config(config.model.params.unet_config).eval()
    with torch.no_grad():  # zero-initialised output layers would make the comparison vacuous
        for param in ours.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    sd = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    ucfg = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config), sd)
    theirs = UNet2DConditionModel(**ucfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    del sd

    h = args.size // 8
    x = torch.randn(args.batch, 4, h, h)
    t = torch.full((args.batch,), 501)
    ctx = torch.randn(args.batch, 77, 768)
    runs = {"ours": lambda: ours(x, t, context=ctx),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample}
    if args.channels_last:
        import copy
        ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        runs["ours-cl"] = lambda: ours_cl(x_cl, t, context=ctx)
    with torch.inference_mode():
        times, outs = time_alternating(runs, args.repeats)
    med = {name: statistics.median(v) for name, v in times.items()}
    err = ((outs["ours"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max()).item()
    print(f"SD v1 UNet, {args.size}x{args.size}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name in runs:
        print(f"  {name:10s} {med[name]:.3f} s/step  (all: {', '.join(f'{v:.3f}' for v in times[name])})")
    print(f"  ratio ours/diffusers = {med['ours'] / med['diffusers']:.3f}  "
          f"(< 1 means ours is faster); max rel. output difference {err:.2e}")


if __name__ == "__main__":
    main()
