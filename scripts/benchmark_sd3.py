"""SD 3's transformer at full size: one step of ours against diffusers' SD3Transformer2DModel
on identical random weights, on this machine.

    python scripts/benchmark_sd3.py                          # SD 3 Medium, 1024x1024, fp32 and bf16
    python scripts/benchmark_sd3.py --config sd3.5_large --dtypes bf16 --size 512
    python scripts/benchmark_sd3.py --parts memory --dtypes bf16   # peak memory, with and without T5
    python scripts/benchmark_sd3.py --parts check --size 512       # the whole pipeline vs diffusers

The tests compare every SD 3 path with diffusers on tiny configs; this times what only the
real shapes show: the MMDiT of ``configs/stable-diffusion/<config>.yaml`` with seeded
random weights in Stability's layout (official weights cannot be downloaded here), batch 2
(one image with guidance), at a mid-schedule timestep, the two sides alternating. diffusers'
model holds our tensors where its converter keeps them (``to_diffusers_sd3``-style, loaded
with ``assign``), so two 8 GB fp32 networks are not needed. The text encoders and the
autoencoder are not built (T5-XXL alone is 19.6 GB in fp32).

``--parts check``: the whole text-to-image pipeline at the config's full size, T5 left out
(its 4.9 billion parameters would not fit twice), random fp32 weights: our latents and
decoded image against diffusers' StableDiffusion3Pipeline holding the same tensors, Euler
``--check_steps`` steps, guidance 7, at ``--size``.

``--parts memory``: the peak resident memory of whole ``scripts/txt2img.py`` runs (fresh
processes, ``--memory_steps`` steps: the peak does not grow with them) on random fp16
files in Stability's layout written once to ``--cache``: ``sd3_medium_incl_clips`` (the
MMDiT, the autoencoder, both CLIPs) alone, and with ``t5xxl_fp16`` given by ``--t5xxl``
(T5's tokenizer: ``--t5_tokenizer`` or one ``ldm.modules.encoders.t5.find_tokenizer``
finds).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd3_medium", help="a config in configs/stable-diffusion")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per side (the best counts)")
    p.add_argument("--parts", default="step", help="step, memory, or both (comma-separated)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "sd3-bench"))
    p.add_argument("--memory_steps", type=int, default=2)
    p.add_argument("--t5_tokenizer", default=None)
    p.add_argument("--check_steps", type=int, default=4)
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if "check" in parts:
        check(args)
    if "step" in parts:
        step(args)
    if "memory" in parts:
        memory(args)


def step(args):
    """One MMDiT step, ours against diffusers', per dtype."""
    import torch
    from omegaconf import OmegaConf
    from ldm.compare import sd3_transformer, time_alternating
    from ldm.util import instantiate_from_config

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / f"{args.config}.yaml")
    net_config = config.model.params.network_config
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        torch.manual_seed(0)
        with torch.device("meta"):
            ours = instantiate_from_config(net_config)
        sd = {}
        g = torch.Generator().manual_seed(0)
        for k, v in ours.state_dict().items():
            if k == "pos_embed":
                sd[k] = torch.zeros(v.shape, dtype=dtype)
            else:
                sd[k] = (torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.01)).to(dtype)
        ours.load_state_dict(sd, assign=True, strict=True)
        ours.eval().requires_grad_(False)
        theirs = sd3_transformer(ours, share=True)
        del sd
        side = args.size // 8
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, side, side, generator=g).to(dtype)
        ctx = torch.randn(2, 77 + 256, 4096, generator=g).to(dtype)
        y = torch.randn(2, 2048, generator=g).to(dtype)
        t = torch.tensor([500.0, 500.0])
        outs = {}

        def run_ours():
            with torch.no_grad():
                outs["ours"] = ours(x, t, ctx, y)

        def run_theirs():
            with torch.no_grad():
                outs["diffusers"] = theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                           pooled_projections=y).sample
        times, _ = time_alternating({"ours": run_ours, "diffusers": run_theirs}, args.repeats,
                                    warmup=False)
        err = ((outs["ours"].float() - outs["diffusers"].float()).abs().max()
               / outs["diffusers"].float().abs().max()).item()
        best = {k: min(v) for k, v in times.items()}
        print(f"{args.config} {name} {args.size}x{args.size}, batch 2: ours "
              f"{best['ours']:.2f} s, diffusers {best['diffusers']:.2f} s, ratio "
              f"{best['ours'] / best['diffusers']:.2f} (all: ours "
              f"{[round(s, 2) for s in times['ours']]}, diffusers "
              f"{[round(s, 2) for s in times['diffusers']]}); max rel diff {err:.1e}",
              flush=True)
        del ours, theirs, outs


def check(args):
    """Our whole txt2img against diffusers' StableDiffusion3Pipeline, T5 left out."""
    import tempfile
    import numpy as np
    import torch
    import diffusers
    from omegaconf import OmegaConf
    from ldm.compare import sd3_components
    from ldm.modules.diffusionmodules.mmdit import sincos_2d
    from ldm.pipeline import Pipeline
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / f"{args.config}.yaml")
    del config.model.params.text_encoders_config.params["t5xxl"]
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("pos_embed"):
            sd[k] = sincos_2d(v.shape[-1], round(v.shape[1] ** 0.5))[None]
        elif "norm" in k and k.endswith("weight") and v.dim() == 1:
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.01)
    model.load_state_dict(sd, assign=True, strict=True)
    model.eval().requires_grad_(False)
    del sd
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    theirs = diffusers.StableDiffusion3Pipeline(**sd3_components(model, Path(tempfile.mkdtemp()),
                                                                 share=True))
    theirs.set_progress_bar_config(disable=True)
    prompt, seed, n = "a lighthouse at dusk, oil painting", 42, args.check_steps
    x, _ = ours.initial_noise([seed], args.size, args.size)
    z = ours.latents([prompt], [seed], sampler="euler", steps=n, scale=7.0, height=args.size,
                     width=args.size, progress=False)
    want = theirs(prompt, num_inference_steps=n, guidance_scale=7.0, height=args.size,
                  width=args.size, latents=x.clone(), output_type="latent").images
    ours_image = np.asarray(ours.decode(z)[0], dtype=np.int16)
    with torch.no_grad():
        pixels = theirs.vae.decode(want / theirs.vae.config.scaling_factor
                                   + theirs.vae.config.shift_factor).sample
    their_image = np.asarray(theirs.image_processor.postprocess(pixels)[0], dtype=np.int16)
    err = ((z - want).abs().max() / want.abs().max()).item()
    print(f"{args.config} without T5, {args.size}x{args.size}, Euler {n} steps, guidance 7, "
          f"fp32: latents max rel diff {err:.1e}; images differ by at most "
          f"{np.abs(ours_image - their_image).max()} of 255", flush=True)


def write_random_file(path, shapes, seed):
    """A safetensors file of random fp16 tensors of ``shapes`` ({key: shape}), written one
    tensor at a time (T5-XXL alone is 9.8 GB in fp16: never held whole)."""
    import json
    import struct
    import torch
    g = torch.Generator().manual_seed(seed)
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k, shape in shapes.items():
            f.write((torch.randn(shape, generator=g) * 0.02).half().numpy().tobytes())


def write_random_files(cache, config):
    """sd3_medium_incl_clips.safetensors and t5xxl_fp16.safetensors of random fp16 weights
    in Stability's layout (once)."""
    from ldm.pipeline import build_model
    cache.mkdir(parents=True, exist_ok=True)
    model_file, t5_file = cache / "sd3_medium_incl_clips.safetensors", cache / "t5xxl_fp16.safetensors"
    shapes = {k: tuple(v.shape) for k, v in build_model(config, meta=True).state_dict().items()}
    t5 = "text_encoders.t5xxl.transformer."
    if not model_file.exists():
        write_random_file(model_file, {k: v for k, v in shapes.items() if not k.startswith(t5)}, 0)
    if not t5_file.exists():
        write_random_file(t5_file, {k[len(t5):]: v for k, v in shapes.items()
                                    if k.startswith(t5)}, 1)
    return model_file, t5_file


def memory(args):
    """Peak resident memory of whole runs, with and without T5, each alone."""
    import subprocess
    config = ROOT / "configs" / "stable-diffusion" / f"{args.config}.yaml"
    model_file, t5_file = write_random_files(Path(args.cache), config)
    for dtype in args.dtypes.split(","):
        for label, extra in (("without T5", []), ("with T5", ["--t5xxl", str(t5_file)] + (
                ["--t5_tokenizer", args.t5_tokenizer] if args.t5_tokenizer else []))):
            out = Path(args.cache) / f"out-{dtype}-{len(extra)}"
            cmd = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--ckpt", str(model_file),
                   "--config", str(config), "--prompt", "a lighthouse at dusk", "--H",
                   str(args.size), "--W", str(args.size), "--n_samples", "1", "--n_iter", "1",
                   "--ddim_steps", str(args.memory_steps), "--precision",
                   {"fp32": "full", "bf16": "bf16"}[dtype], "--safety_checker", "none",
                   "--outdir", str(out)] + extra
            wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                       "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                       "sys.stderr.write(r.stderr[-2000:]); "
                       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                       "time.perf_counter() - t); sys.exit(r.returncode)")
            r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
            lines = [l for l in r.stderr.splitlines() if not l.startswith("sampling:")]
            if r.returncode:
                print(f"{dtype} {label}: failed: {lines[-1] if lines else r.returncode}", flush=True)
                continue
            kib, seconds = r.stdout.split()
            said = [l for l in lines if "T5" in l or "using" in l]
            print(f"{args.config} {dtype} {args.size}x{args.size} {label}, {args.memory_steps} "
                  f"steps: peak {int(kib) / 2**20:.1f} GiB, {float(seconds):.0f} s; {said}",
                  flush=True)


if __name__ == "__main__":
    main()
