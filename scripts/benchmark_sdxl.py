"""SDXL at full size: ours against diffusers on identical random weights, on this machine.

    python scripts/benchmark_sdxl.py                                # everything, 1024x1024
    python scripts/benchmark_sdxl.py --parts check,unet --size 1024
    python scripts/benchmark_sdxl.py --parts memory --memory_runs fp32:1024:2,bf16:512:1

The tests compare every SDXL path with diffusers on tiny SDXL-shaped configs; this script
does what only the real shapes show, on ``configs/stable-diffusion/sd_xl_base.yaml`` with
seeded random weights in the official layout (``ldm.compare.random_sd``; official weights
cannot be downloaded here). Two fp32 SDXL models do not fit 24 GiB (14 GB each), so in one
process diffusers' UNet holds our UNet's tensors (``share_unet``: converted by diffusers'
own converter, loaded with ``assign``) and the text encoders and autoencoder are copies;
the memory part runs each side alone in a fresh process.

Parts:
  check   txt2img, DDIM ``--steps`` steps, guidance 5, at ``--size``: every step's latents,
          the final latents and the decoded 8-bit image against StableDiffusionXLPipeline
  unet    one UNet step, batch 2 (one image with guidance), t = 501, alternating; its GFLOP
          (flop counter, meta device) and the fraction of the fp32 matmul peak
  parts   the two text encoders (prompt + empty negative) and one VAE decode at ``--size``;
          and the whole image composed from the measured parts: ours at DPM++ 2M Karras 20
          against diffusers' defaults (Euler 50), both guidance 5
  memory  peak resident memory, fresh processes: ours (scripts/txt2img.py from a random
          fp16 single file) per ``--memory_runs`` (dtype:size:steps), and diffusers'
          StableDiffusionXLPipeline (the same file through its own ``from_single_file``
          with a local config folder, saved as a pipeline folder) in fp32
"""
import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CONFIG = ROOT / "configs" / "stable-diffusion" / "sd_xl_base.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
PARTS = ("check", "unet", "parts", "memory")

DIFFUSERS_RUN = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
folder, steps, out, dtype, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
pipe(%r, num_inference_steps=steps, height=size, width=size,
     generator=torch.Generator().manual_seed(42)).images[0].save(out)
""" % PROMPT

CONVERT_RUN = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
ckpt, configs, folder = sys.argv[1:4]
pipe = StableDiffusionXLPipeline.from_single_file(ckpt, config=configs, local_files_only=True,
                                                  torch_dtype=torch.float16)
pipe.save_pretrained(folder)
"""


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of the check")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side")
    p.add_argument("--memory_runs", default="fp32:1024:2,bf16:512:1",
                   help="ours' fresh runs, dtype:size:steps (bf16 is emulated, slowly, on "
                        "a CPU without native bf16: a small size shows the weights' peak)")
    p.add_argument("--config", type=Path, default=CONFIG,
                   help="an SDXL config (a tiny one tries the script out in seconds)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sdxl-bench")
    p.add_argument("--make_files", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        sys.exit(f"unknown part(s) {sorted(set(parts) - set(PARTS))}; use {PARTS}")
    import torch
    from benchmark import cpu_name
    from ldm.pipeline import bf16_is_native
    print(f"{args.config.name}, random weights; {cpu_name()}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{bf16_is_native(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}", flush=True)
    if args.make_files:
        return make_files(args.cache, args.config)
    if "memory" in parts:   # first: fresh processes need this one's memory free
        memory(args)
    if set(parts) & {"check", "unet", "parts"}:
        in_process(args, parts)


def in_process(args, parts):
    import diffusers
    import torch
    from benchmark import count_gflop, matmul_peak, timed
    from ldm.compare import diffusers_components, random_sd
    from ldm.pipeline import Pipeline, build_model
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model, config = random_sd(0, args.config)
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False, model_name="random SDXL")
    tmp = tempfile.TemporaryDirectory()
    theirs = diffusers.StableDiffusionXLPipeline(**diffusers_components(
        model, config, Path(tmp.name), share_unet=True))
    theirs.set_progress_bar_config(disable=True)
    theirs.text_encoder.set_attn_implementation("sdpa")   # as from_pretrained gives them
    theirs.text_encoder_2.set_attn_implementation("sdpa")
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    size, cpu = args.size, torch.device("cpu")
    if "check" in parts:
        check(ours, theirs, size, args.steps)
    h = size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=gen)
    t = torch.full((2,), 501)
    cond = model.conditioning([PROMPT, ""], model.size_values(size, size))
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    unet = model.model.diffusion_model
    pooled = theirs.text_encoder_2.config.projection_dim
    rows = {}
    if "unet" in parts:
        meta = build_model(args.config, meta=True).model.diffusion_model
        gflop = count_gflop(lambda: meta(x.to("meta"), t.to("meta"),
                                          context=cond["crossattn"].to("meta"),
                                          y=cond["vector"].to("meta")))
        peak = matmul_peak(cpu, torch.float32)
        m = timed({"ours": lambda: unet(x, t, context=cond["crossattn"], y=cond["vector"]),
                   "diffusers": lambda: theirs.unet(
                       x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs={
                           "text_embeds": cond["vector"][:, :pooled], "time_ids": time_ids}).sample},
                  args.repeats, cpu)
        rows["unet"] = m
        rate = gflop / m["ours"]
        print(f"unet      {size}x{size} batch 2 fp32: ours {m['ours']:.2f} s, diffusers "
              f"{m['diffusers']:.2f} s, ratio {m['ours'] / m['diffusers']:.3f} (paired "
              f"{m['paired']:.3f}); {gflop:,.0f} GFLOP, {rate:.0f} GFLOP/s = {rate / peak:.0%} "
              f"of the {peak:.0f} GFLOP/s fp32 matmul peak", flush=True)
    if "parts" in parts:
        # the prompt through both text encoders (the empty negative is zeros on both sides)
        m = timed({"ours": lambda: model.conditioning([PROMPT], model.size_values(size, size)),
                   "diffusers": lambda: theirs.encode_prompt(
                       PROMPT, device=cpu, do_classifier_free_guidance=False)},
                  args.repeats, cpu)
        rows["text"] = m
        print(f"text      prompt fp32: ours {m['ours']:.2f} s, diffusers "
              f"{m['diffusers']:.2f} s, ratio {m['ours'] / m['diffusers']:.3f}", flush=True)
        z = x[:1]
        m = timed({"ours": lambda: model.decode_first_stage(z),
                   "diffusers": lambda: theirs.vae.decode(z / theirs.vae.config.scaling_factor).sample},
                  args.repeats, cpu)
        rows["vae"] = m
        print(f"vae       decode {size}x{size} fp32: ours {m['ours']:.2f} s, diffusers "
              f"{m['diffusers']:.2f} s, ratio {m['ours'] / m['diffusers']:.3f}", flush=True)
    if {"unet", "text", "vae"} <= rows.keys():
        def image(side, steps):
            return rows["text"][side] + steps * rows["unet"][side] + rows["vae"][side]
        a, b = image("ours", 20), image("diffusers", 50)
        print(f"image     {size}x{size} fp32, composed from the parts above: ours DPM++ 2M "
              f"Karras 20 steps {a:.0f} s, diffusers' defaults (Euler 50) {b:.0f} s, ratio "
              f"{a / b:.3f}; the same 50 steps: ours {image('ours', 50):.0f} s, ratio "
              f"{image('ours', 50) / b:.3f}", flush=True)
    tmp.cleanup()


def check(ours, theirs, size, steps):
    """DDIM ``steps`` at ``size``, guidance 5, the zeroed empty negative: step by step."""
    import numpy as np
    import torch
    mine, its = [], []
    start = time.perf_counter()
    z_ours = ours.latents([PROMPT], [7], sampler="ddim", steps=steps, scale=5.0, height=size,
                          width=size, progress=False,
                          callback=lambda i, x, x0: mine.append(x.clone()))
    t_ours = time.perf_counter() - start

    def collect(pipe, i, t, state):
        its.append(state["latents"].clone())
        return state
    start = time.perf_counter()
    z_theirs = theirs([PROMPT], num_inference_steps=steps, guidance_scale=5.0, height=size,
                      width=size, output_type="latent", callback_on_step_end=collect,
                      generator=[torch.Generator().manual_seed(7)]).images
    t_theirs = time.perf_counter() - start
    a = np.asarray(ours.decode(z_ours)[0]).astype(int)
    b = theirs.image_processor.postprocess(
        theirs.vae.decode(z_theirs / theirs.vae.config.scaling_factor).sample, output_type="np")[0]
    pixels = int(np.abs(a - (b * 255).round().astype(int)).max())
    errors = [rel_err(x, y) for x, y in zip(mine, its)]
    final = rel_err(z_ours, z_theirs)
    verdict = "equal to float tolerance" if max(errors + [final]) < 1e-3 else "DIFFERENT"
    print(f"check     txt2img {size}x{size} DDIM {steps}, guidance 5: max step rel err "
          f"{max(errors):.1e}, final latents {final:.1e} (|z| max {float(z_ours.abs().max()):.2f}), "
          f"decoded 8-bit max diff {pixels}; latents ours {t_ours:.0f} s, diffusers "
          f"{t_theirs:.0f} s: {verdict}", flush=True)


def memory(args):
    """Fresh processes from one random fp16 single file: ours per --memory_runs, diffusers
    fp32 at the first run's size and steps."""
    import subprocess
    from benchmark_memory import peak_rss_gib
    # the files are made by a process of their own, whose memory is then given back
    subprocess.run([sys.executable, __file__, "--config", args.config, "--cache", args.cache,
                    "--make_files"], check=True)
    ckpt, folder = make_files(args.cache, args.config)
    runs = [r.split(":") for r in args.memory_runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, size, steps in runs:
            precision = {"fp32": "full", "bf16": "bf16"}[dtype]
            gib, seconds = peak_rss_gib([
                sys.executable, ROOT / "scripts" / "txt2img.py", "--ckpt", ckpt, "--config",
                args.config, "--prompt",
                PROMPT, "--H", size, "--W", size, "--n_samples", 1, "--n_iter", 1,
                "--ddim_steps", steps, "--precision", precision, "--backend", "torch",
                "--safety_checker", "none", "--skip_grid", "--outdir", Path(tmp) / dtype])
            print(f"memory    ours {dtype} {size}x{size} {steps} steps: peak RSS {gib:.2f} GiB "
                  f"({seconds:.0f} s, load included)", flush=True)
        dtype, size, steps = runs[0]
        gib, seconds = peak_rss_gib([sys.executable, "-c", DIFFUSERS_RUN, folder, steps,
                                     Path(tmp) / "theirs.png", "float32", size])
        print(f"memory    diffusers fp32 {size}x{size} {steps} steps: peak RSS {gib:.2f} GiB "
              f"({seconds:.0f} s, load included)", flush=True)


def make_files(cache, config_path):
    """The random SDXL as a single fp16 file in the official layout, and the diffusers
    pipeline folder that diffusers' own ``from_single_file`` makes of it (offline: a
    folder of configs written from our shapes)."""
    import subprocess
    from safetensors.torch import save_file
    stem = Path(config_path).stem
    ckpt, folder = cache / f"{stem}-random.safetensors", cache / f"{stem}-random-diffusers"
    if ckpt.exists() and (folder / "model_index.json").exists():
        return ckpt, folder
    cache.mkdir(parents=True, exist_ok=True)
    from ldm.compare import random_sd
    model, config = random_sd(0, config_path)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, ckpt)
    configs = cache / f"{stem}-configs"
    write_configs(model, config, configs)
    del model
    gc.collect()
    r = subprocess.run([sys.executable, "-c", CONVERT_RUN, ckpt, configs, folder],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"diffusers could not convert {ckpt}:\n{r.stderr[-3000:]}")
    return ckpt, folder


def write_configs(model, config, folder):
    """A StableDiffusionXLPipeline folder without weights: model_index.json and each
    component's config, from ``model``'s shapes (diffusers' scheduler as SDXL 1.0's)."""
    import diffusers
    from ldm.compare import diffusers_components
    parts = diffusers_components(model, config, folder / "tok", share_unet=True)
    parts["scheduler"] = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(folder / name)


if __name__ == "__main__":
    main()
