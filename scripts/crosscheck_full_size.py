"""Our pipeline against diffusers' at full size, on identical random weights: the tests do
this on tiny SD-shaped configs; this script does it once on a real config's shapes (SD 2.1
768-v, 512-base, the 9-channel inpainting model; SD v1 too), where tiny models cannot show
what only size shows (attention over 9,216 tokens, 64-wide heads at 1,280 channels, the
autoencoder at 768 px).

    python scripts/crosscheck_full_size.py --config configs/stable-diffusion/v2-inference-v.yaml --size 768
    python scripts/crosscheck_full_size.py --config configs/stable-diffusion/v2-inpainting-inference.yaml \
        --tasks inpaint

Random weights in the official layout (``ldm.compare.random_sd``), diffusers' models made
from them by diffusers' own single-file converters, the same noise and prompts, DDIM: every
step's latents compared, then the final latents, then (txt2img) the decoded 8-bit images.
fp32 on the CPU; two copies of SD 2 fit in 24 GiB (about 5.2 GB each).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("txt2img", "img2img", "inpaint")
PROMPTS, NEGATIVE, SEEDS = ["a photograph of an astronaut riding a horse"], [""], [7]


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def inputs(size):
    """A random RGB image and a rectangular mask (1 = repaint) at ``size``."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: 5 * size // 8] = 255
    return image, Image.fromarray(mask)


def run(task, ours, model, config, folder, size, steps, strength):
    """(per-step rel errors, final rel error, max 8-bit pixel difference or None)."""
    import gc

    import diffusers
    import torch
    from ldm.compare import diffusers_components
    gc.collect()   # the previous task's diffusers copy (5 GB at SD 2's size) goes first
    from ldm.image_io import pil_to_tensor
    image, mask = inputs(size)
    kw, theirs_kw, cls = {}, {}, diffusers.StableDiffusionPipeline
    if task != "txt2img":
        init = ours.encode([image])
        kw = {"init": init, "strength": strength}
        theirs_kw = {"image": init.clone(), "strength": strength}
        cls = diffusers.StableDiffusionImg2ImgPipeline
    if task == "inpaint":
        small, full = ours.latent_mask(mask)
        cls = diffusers.StableDiffusionInpaintPipeline
        kw["mask"] = small
        theirs_kw.update(mask_image=full.clone(), height=size, width=size)
        if ours.is_inpainting_model:
            masked = model.encode_image(pil_to_tensor([image]) * (1 - full))
            kw["masked"] = masked
            theirs_kw["masked_image_latents"] = masked.clone()
        else:   # latent blending; diffusers wants the argument, a 4-channel UNet ignores it
            theirs_kw["masked_image_latents"] = init.clone()
    elif task == "txt2img":
        theirs_kw.update(height=size, width=size)
    theirs = cls(**diffusers_components(model, config, folder))
    theirs.set_progress_bar_config(disable=True)
    mine, its = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        z_ours = ours.latents(PROMPTS, SEEDS, negative_prompts=NEGATIVE, sampler="ddim",
                              steps=steps, scale=9.0, height=size, width=size, progress=False,
                              callback=lambda i, x, x0: mine.append(x.clone()), **kw)
        t_ours = time.perf_counter() - start

        def collect(pipe, i, t, state):
            its.append(state["latents"].clone())
            return state
        start = time.perf_counter()
        z_theirs = theirs(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps,
                          guidance_scale=9.0, output_type="latent",
                          generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                          callback_on_step_end=collect, **theirs_kw).images
        t_theirs = time.perf_counter() - start
        pixels = None
        if task == "txt2img":
            import numpy as np
            a = np.asarray(ours.decode(z_ours)[0]).astype(int)
            b = theirs.image_processor.postprocess(
                theirs.vae.decode(z_theirs / theirs.vae.config.scaling_factor).sample,
                output_type="np")[0]
            pixels = int(np.abs(a - (b * 255).round().astype(int)).max())
    steps_err = [rel_err(x, y) for x, y in zip(mine, its)]
    if len(mine) != len(its):
        raise SystemExit(f"{task}: ours ran {len(mine)} steps, diffusers {len(its)}")
    return steps_err, rel_err(z_ours, z_theirs), pixels, float(z_ours.abs().max()), (t_ours, t_theirs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/stable-diffusion/v2-inference-v.yaml"))
    p.add_argument("--size", type=int, default=None, help="default: the config's native size")
    p.add_argument("--tasks", default=None, help=f"comma-separated of {TASKS} (default: all "
                   "the model takes)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--strength", type=float, default=0.67)
    args = p.parse_args(argv)
    import torch
    from ldm.compare import random_sd
    from ldm.pipeline import Pipeline
    torch.set_grad_enabled(False)
    model, config = random_sd(0, args.config)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    size = args.size or ours.native_size
    tasks = args.tasks.split(",") if args.tasks else (
        ["inpaint"] if ours.is_inpainting_model else ["txt2img", "img2img", "inpaint"])
    print(f"{Path(args.config).name}: {model.parameterization} prediction, {size}x{size}, "
          f"DDIM {args.steps} steps, guidance 9, random weights, fp32, "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for task in tasks:
            steps, final, pixels, peak, (t1, t2) = run(task, ours, model, config,
                                                       Path(tmp) / task, size, args.steps,
                                                       args.strength)
            worst = max([worst, final, *steps])
            print(f"{task:8s} steps {len(steps)}: max step rel err "
                  f"{max(steps, default=0):.1e}, final latents rel err {final:.1e} (|z| max "
                  f"{peak:.2f})" + (f", decoded 8-bit max diff {pixels}" if pixels is not None
                                    else "") + f"; ours {t1:.0f} s, diffusers {t2:.0f} s")
    print("equal to float tolerance" if worst < 1e-3 else f"DIFFERENT (worst {worst:.1e})")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
