"""Ours against diffusers on identical weights, in one process, interleaved: the speed
figures of the README and of the closing notes.

    python scripts/benchmark.py                                  # everything (about 2.5 h here)
    python scripts/benchmark.py --parts peak,unet,vae,text --sizes 256
    python scripts/benchmark.py --parts image --sizes 512 --image_repeats 1
    python scripts/benchmark.py --parts memory                   # fresh processes, 512x512
    python scripts/benchmark.py --device cuda                    # fp16 too

Random SD-v1-sized weights are built once (seeded) in our layout and converted with
diffusers' own converter of the original layout, so both sides hold the same numbers. Every
comparison runs both sides alternately after one warm-up call each; the median of the
repeats is reported with the ratio ours / diffusers (< 1: ours is faster). Both sides run
under the same torch settings (threads, denormal flushing) in the same process.

Parts:
  peak       the device's large-matmul rate in each dtype (the "peak" fractions refer to)
  unet       one UNet step, batch 2 (one image with guidance), t = 501, per size
  vae        decoding one latent to pixels, per size
  text       encoding a prompt and the empty prompt (tokenizer included)
  denormals  our fp32 UNet step with torch.set_flush_denormal off and on
  image      whole images (text, sampling, decode, PIL), per size: DDIM 50 on both sides,
             and ours at the recommended settings against diffusers' defaults (PNDM 50)
  builtin    the same whole-image pair on the built-in shapes model (diffusers gets a
             timing twin without its positional features)
  memory     peak resident memory of a 512x512 txt2img run, ours (scripts/txt2img.py)
             and diffusers (StableDiffusionPipeline), each a fresh process, per dtype
  fidelity   not a timing: the built-in model's images in each reduced dtype against fp32
             from the same noise (PSNR), and a side-by-side picture in docs/precision/;
             --deepcache 2 and 3 against plain images and a tiled decode against the
             whole one, pictures in docs/speedups/
  options    each optional speed-up (--deepcache 2 and 3, --attention_slicing, --compile)
             against the plain run, ours only: whole images at the recommended settings,
             random SD weights per size and the built-in model, with the image's distance
             to the plain one from the same noise (PSNR; latents' relative distance);
             --compile's compile time is its warm-up's
  tiling     VAE decode at 1024x1024, whole against --vae_tiling (64: 512-px tiles): time,
             peak RSS (fresh processes) and PSNR to the whole decode
  fewstep    whole 512x512 images with an LCM-LoRA (random, UNet only, merged on both sides):
             ours LCM 4 steps against diffusers' LCMScheduler pipeline (4 steps, guidance
             1, load_lora_weights + fuse), with the full autoencoder and with TAESD
             (random AutoencoderTiny weights; ours through --vae's loader), and ours LCM 4
             + TAESD against diffusers' default (PNDM 50, guidance 7.5); PSNR of ours to
             diffusers' image from the same noise
  fixedshape one UNet step at one fixed shape (batch 2, the last of --sizes), ours only:
             eager against three ahead-of-time forms for that shape, torch.compile with
             static shapes (inductor freezing: --compile), torch.export + AOTInductor (a
             compiled .pt2 package) and oneDNN Graph (TorchScript trace, freeze, oneDNN
             fusion): step time, compile time, GFLOP/s against the matmul peak, the
             output's distance to eager's (docs/benchmarks/*-fixedshape.md)
  controlnet one UNet step (batch 2, the last of --sizes) with a ControlNet (random,
             SD-1.5-sized) against the same step without, ours and diffusers'
             (ControlNetModel + UNet2DConditionModel, the same weights): the extra cost
  hires      A1111's hires fix on a random SD-1.5-sized model, 512 -> 1024 (the last of
             --sizes doubled): DPM++ 2M Karras 20 steps, then the latent upscale and 20
             steps at strength 0.7; ours against diffusers' StableDiffusionPipeline (latents
             out) + interpolation + StableDiffusionImg2ImgPipeline running as many steps,
             the same weights; each side's first pass alone too
  upscale    the SD x4 upscaler (random weights, x4-upscaling.yaml): one UNet step on one
             128x128 tile (batch 2: guidance), ours against diffusers' UNet; then ours
             upscaling a 512x512 image to 2048x2048 in 128-pixel tiles overlapping by 32
             with --upscale_steps DDIM steps, in the last of --dtypes (and the time 75
             steps would take)
  peer       the fastest CPU engine: ours on torch and on the OpenVINO backend against
             optimum-intel's OVStableDiffusionPipeline (its own process and exporter, the
             same diffusers folder), per size and dtype: per step, 10-step image, first
             conversion, cached start, peak RSS, PSNR (scripts/benchmark_openvino.py;
             --peer_python names the environment with optimum-intel, docs/openvino.md)

GFLOP counts come from torch.utils.flop_counter on the meta device (attention counted as
its two matmuls). The dtypes are fp32 and bf16 (ours: --precision bf16, weights cast once;
diffusers: torch_dtype=torch.bfloat16), plus fp16 on CUDA.
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = "a painting of a virus monster playing guitar"
RECOMMENDED = dict(sampler="dpmpp_2m", schedule="karras", steps=20)  # README's "Samplers"
PARTS = ("peak", "unet", "vae", "text", "denormals", "image", "builtin", "memory", "fidelity",
         "options", "tiling", "fewstep", "fixedshape", "controlnet", "hires", "upscale",
         "peer")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    p.add_argument("--sizes", default="256,512", help="image sides for unet, vae, image")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16 (CPU), fp32,bf16,fp16 (CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each component")
    p.add_argument("--image_repeats", type=int, default=1, help="timed runs of each whole image")
    p.add_argument("--image_steps", type=int, default=50,
                   help="steps of the DDIM / DDIM whole-image pair")
    p.add_argument("--options", default="all",
                   help="for the options part: comma-separated of deepcache2, deepcache3, "
                        "slicing, compile, or all")
    p.add_argument("--image_pairs", default="ddim,recommended",
                   help="whole-image pairs: ddim (DDIM 50 on both sides), recommended (ours "
                        "2M Karras 20 against diffusers' PNDM 50)")
    p.add_argument("--config", type=Path, default=None,
                   help="the random model's config for unet, vae, text and image (default: "
                        "SD v1's; e.g. configs/stable-diffusion/v2-inference-v.yaml)")
    p.add_argument("--upscale_steps", type=int, default=5,
                   help="DDIM steps of the upscale part's whole 512 -> 2048 image (0: the "
                        "step alone)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peer_python", default=str(Path.home() / ".cache/ov-peer/bin/python"),
                   help="for the peer part: a Python with optimum-intel ('none': ours only)")
    p.add_argument("--flush_denormal", action="store_true",
                   help="torch.set_flush_denormal(True) for every part (both sides)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sd-bench",
                   help="random checkpoint and diffusers folder for the memory part")
    return p


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISION = {"fp32": "full", "bf16": "bf16", "fp16": "autocast"}


class Report:
    """Rows printed as they come, and a summary table at the end."""

    def __init__(self):
        self.rows = []

    def add(self, part, setting, ours, theirs=None, gflop=None, peak=None, note="", paired=None):
        row = dict(part=part, setting=setting, ours=ours, theirs=theirs, gflop=gflop,
                   peak=peak, note=note, paired=paired)
        self.rows.append(row)
        print(self.format(row), flush=True)

    @staticmethod
    def format(r):
        cells = [f"{r['part']:9s} {r['setting']:34s}"]
        if r["ours"] is not None:
            cells.append(f"ours {r['ours']:8.3f} s")
        if r["theirs"] is not None:
            cells.append(f"diffusers {r['theirs']:8.3f} s  ratio {r['ours'] / r['theirs']:.3f}")
        if r.get("paired") is not None:
            cells.append(f"paired {r['paired']:.3f}")
        if r["gflop"] and r["ours"]:
            rate = r["gflop"] / r["ours"]
            cells.append(f"{r['gflop']:7.1f} GFLOP {rate:6.1f} GFLOP/s"
                         + (f" ({rate / r['peak']:.0%} of peak)" if r["peak"] else ""))
        if r["note"]:
            cells.append(r["note"])
        return "  ".join(cells)

    def summary(self):
        print("\nsummary (median seconds; ratio ours/diffusers, < 1: ours faster)")
        for r in self.rows:
            print("  " + self.format(r))
        # the headline: ours at the recommended settings in a reduced dtype against
        # diffusers' defaults (PNDM 50, fp32), from the rows above
        for r in self.rows:
            if r["part"] == "image" and "Karras" in r["setting"] and " fp32 " in r["setting"]:
                for other in self.rows:
                    if (other["part"] == "image" and "Karras" in other["setting"]
                            and other["setting"].replace(" bf16 ", " fp32 ").replace(
                                " fp16 ", " fp32 ") == r["setting"] and other is not r):
                        words = other["setting"].split()
                        print(f"  image     {' '.join(words[:-7])} ours {words[-7]} 2M "
                              f"Karras 20 / diffusers fp32 PNDM 50: ratio "
                              f"{other['ours'] / r['theirs']:.3f}")


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(runs, repeats, device, warmup=True):
    """Median seconds of each of ``runs`` ({name: fn}), alternating after one warm-up each;
    with "ours" and "diffusers" among them, also "paired": the median over the rounds of
    ours / diffusers within a round, which a machine whose speed drifts (a shared virtual
    CPU) disturbs less than the ratio of the medians."""
    import torch
    from ldm.compare import time_alternating

    def synced(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return run
    with torch.inference_mode():
        times, _ = time_alternating({k: synced(f) for k, f in runs.items()}, repeats, warmup)
    medians = {k: statistics.median(v) for k, v in times.items()}
    if "ours" in times and "diffusers" in times:
        medians["paired"] = statistics.median(a / b for a, b in zip(times["ours"], times["diffusers"]))
    return medians


def matmul_peak(device, dtype):
    """Best GFLOP/s of square matmuls of 2048 and 4096 in ``dtype``."""
    import torch
    best = 0.0
    for n in (2048, 4096):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        reps = 8 if n == 2048 else 2
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def count_gflop(fn):
    """GFLOP of ``fn()`` run on the meta device (no compute; SDPA counted as matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def sd_flops(config, sizes):
    """{(part, size): GFLOP} for the SD networks, counted on the meta device."""
    import torch
    from ldm.pipeline import build_model
    meta = build_model(config, meta=True)
    out = {}
    ctx = torch.empty(2, 77, context_width(config), device="meta")
    for s in sizes:
        h = s // 8
        x = torch.empty(2, 4, h, h, device="meta")
        t = torch.full((2,), 501, device="meta")
        out["unet", s] = count_gflop(lambda: meta.model.diffusion_model(x, t, context=ctx))
        z = torch.empty(1, 4, h, h, device="meta")
        out["vae", s] = count_gflop(lambda: meta.first_stage_model.decode(z))
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    out["text", 0] = count_gflop(lambda: meta.cond_stage_model.encode_ids(ids))
    return out


def context_width(config):
    return config.model.params.unet_config.params.context_dim


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        sys.exit(f"unknown part(s) {sorted(set(parts) - set(PARTS))}; use {PARTS}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")).split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    from ldm.pipeline import bf16_is_native
    print(f"device {device}: {cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}"
          f", capability {torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else ''}"
          f", native bf16 {bf16_is_native(device)}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, flush denormal {args.flush_denormal}", flush=True)
    report = Report()
    peaks = {}
    if "peak" in parts or any(p in parts for p in ("unet", "vae", "text")):
        for d in dtypes:
            peaks[d] = matmul_peak(device, getattr(torch, DTYPES[d]))
            report.add("peak", f"matmul {d}", None, note=f"{peaks[d]:.1f} GFLOP/s")
    if any(p in parts for p in ("unet", "vae", "text", "denormals", "image")):
        sd_parts(args, parts, device, dtypes, sizes, peaks, report)
    if "builtin" in parts:
        builtin_part(args, device, dtypes, report)
    if "memory" in parts:
        memory_part(args, dtypes, report)
    if "fidelity" in parts:
        fidelity_part(device, dtypes, report)
    if "options" in parts:
        options_part(args, device, dtypes, sizes, report)
    if "tiling" in parts:
        tiling_part(args, dtypes, report)
    if "fewstep" in parts:
        fewstep_part(args, device, dtypes, report, size=sizes[-1])
    if "fixedshape" in parts:
        fixedshape_part(args, device, dtypes, report, size=sizes[-1])
    if "controlnet" in parts:
        controlnet_part(args, device, dtypes, report, size=sizes[-1])
    if "hires" in parts:
        hires_part(args, device, dtypes, report, size=sizes[-1])
    if "upscale" in parts:
        upscale_part(args, device, dtypes, report)
    report.summary()
    if "peer" in parts:   # its own summary: three engines, not ours against diffusers
        import benchmark_openvino
        hints = {"fp32": "f32", "bf16": "bf16"}
        benchmark_openvino.main(["--sizes", args.sizes, "--peer-python", args.peer_python,
                                 "--precisions", ",".join(hints[d] for d in dtypes if d in hints),
                                 "--cache", str(args.cache)])


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def sd_parts(args, parts, device, dtypes, sizes, peaks, report):
    import tempfile

    import diffusers
    import torch
    from ldm.compare import diffusers_components, random_sd
    from ldm.pipeline import Pipeline

    model, config = random_sd(config_path=args.config)
    flops = sd_flops(config, sizes)
    tmp = tempfile.TemporaryDirectory()
    components = diffusers_components(model, config, Path(tmp.name) / "tokenizer")
    theirs = diffusers.StableDiffusionPipeline(**components).to(device)
    theirs.set_progress_bar_config(disable=True)
    default_attention(theirs)
    ddim = theirs.scheduler
    pndm = diffusers.PNDMScheduler.from_config(ddim.config, skip_prk_steps=True)
    model.to(device)
    gen = torch.Generator("cpu").manual_seed(0)
    ctx = torch.randn(2, 77, context_width(config), generator=gen).to(device)
    for d in dtypes:  # fp32 first: the casts below are one way
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random SD")
        if ours.dtype != dtype:
            sys.exit(f"--dtypes {d}: our --precision {PRECISION[d]} computes in {ours.dtype} "
                     f"on {device.type}")
        theirs.to(dtype=dtype)  # ours: Pipeline cast the weights (norms kept fp32)
        unet, vae = theirs.unet, theirs.vae
        for s in sizes:
            h = s // 8
            x = torch.randn(2, 4, h, h, generator=gen).to(device)
            t = torch.full((2,), 501, device=device)
            if "unet" in parts:
                def ours_unet():
                    with ours.autocast:
                        return model.apply_model(x, t, ctx)
                m = timed({"ours": ours_unet,
                           "diffusers": lambda: unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample},
                          args.repeats, device)
                report.add("unet", f"{s}x{s} batch 2 {d}", m["ours"], m["diffusers"],
                           flops["unet", s], peaks.get(d), paired=m["paired"])
            if "vae" in parts:
                z = x[:1]

                def ours_vae():
                    with ours.autocast:
                        return model.decode_first_stage(z)
                m = timed({"ours": ours_vae,
                           "diffusers": lambda: vae.decode(z.to(dtype) / vae.config.scaling_factor).sample},
                          args.repeats, device)
                report.add("vae", f"decode {s}x{s} {d}", m["ours"], m["diffusers"],
                           flops["vae", s], peaks.get(d), paired=m["paired"])
            if "denormals" in parts and d == "fp32":
                def flushed(on):
                    def run():
                        torch.set_flush_denormal(on)
                        try:
                            return model.apply_model(x, t, ctx)
                        finally:
                            torch.set_flush_denormal(args.flush_denormal)
                    return run
                m = timed({"off": flushed(False), "on": flushed(True)}, args.repeats, device)
                report.add("denormals", f"unet {s}x{s} fp32 flush on", m["on"],
                           note=f"off {m['off']:.3f} s, on/off {m['on'] / m['off']:.3f}")
        if "text" in parts:
            def ours_text():
                with ours.autocast:
                    return model.get_learned_conditioning([PROMPT, ""])
            m = timed({"ours": ours_text,
                       "diffusers": lambda: theirs.encode_prompt(PROMPT, device, 1, True, "")},
                      args.repeats, device)
            report.add("text", f"prompt + empty {d}", m["ours"], m["diffusers"],
                       flops["text", 0], peaks.get(d), paired=m["paired"])
        if "image" in parts:
            for s in sizes:
                whole_images(ours, theirs, ddim, pndm, s, d, args, device, report)
        gc.collect()
    tmp.cleanup()


def default_attention(pipe):
    """The text encoder with transformers' default attention (SDPA), as ``from_pretrained``
    gives it: ``ldm.compare`` builds it eager, for exact cross-checks."""
    pipe.text_encoder.set_attn_implementation("sdpa")


def whole_images(ours, theirs, ddim, pndm, size, d, args, device, report, label=""):
    """DDIM 50 on both sides, and ours at the recommended settings against diffusers'
    defaults (PNDM 50): whole images, prompt to PIL."""
    import torch

    def ours_run(**kw):
        return lambda: ours.generate(PROMPT, seeds=0, height=size, width=size,
                                     progress=False, **kw)

    def theirs_run(scheduler, steps=50):
        def run():
            theirs.scheduler = scheduler
            return theirs(PROMPT, num_inference_steps=steps, height=size, width=size,
                          generator=torch.Generator("cpu").manual_seed(0)).images
        return run
    with torch.inference_mode():  # warm-up: 2-step images, not whole 50-step ones
        ours_run(sampler="ddim", steps=2)()
        theirs_run(ddim, 2)()
    setting = f"{label}{size}x{size} {d}"
    pairs = getattr(args, "image_pairs", "ddim,recommended").split(",")
    if "ddim" in pairs:
        n = getattr(args, "image_steps", 50)
        m = timed({"ours": ours_run(sampler="ddim", steps=n), "diffusers": theirs_run(ddim, n)},
                  args.image_repeats, device, warmup=False)
        report.add("image", f"{setting} DDIM {n} / DDIM {n}", m["ours"], m["diffusers"])
    if "recommended" in pairs:
        m = timed({"ours": ours_run(**RECOMMENDED), "diffusers": theirs_run(pndm)},
                  args.image_repeats, device, warmup=False)
        report.add("image", f"{setting} 2M Karras 20 / PNDM 50", m["ours"], m["diffusers"])


def builtin_part(args, device, dtypes, report):
    import tempfile

    import diffusers
    import torch
    from ldm.compare import diffusers_components
    from ldm.pipeline import BUILTIN_DIR, Pipeline, load_config
    for d in dtypes:
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline.load(BUILTIN_DIR / "model.safetensors", device=device, safety=False,
                             watermark=False, precision=PRECISION[d])
        with tempfile.TemporaryDirectory() as tmp:
            # a twin in fp32 (built from the fp32-loaded weights), then cast like ours
            twin = Pipeline.load(BUILTIN_DIR / "model.safetensors", device=device,
                                 safety=False, watermark=False, precision="full").model
            components = diffusers_components(twin, load_config(BUILTIN_DIR / "config.yaml"),
                                              Path(tmp) / "tokenizer", drop_pos_emb=True)
            theirs = diffusers.StableDiffusionPipeline(**components).to(device, dtype)
            theirs.set_progress_bar_config(disable=True)
            default_attention(theirs)
            ddim = theirs.scheduler
            pndm = diffusers.PNDMScheduler.from_config(ddim.config, skip_prk_steps=True)
            whole_images(ours, theirs, ddim, pndm, ours.native_size, d,
                         argparse.Namespace(image_repeats=max(args.repeats, args.image_repeats)),
                         device, report, label="built-in ")


def memory_part(args, dtypes, report):
    """Peak RSS of fresh processes (benchmark_memory's runs), 2 steps, at the first of
    --sizes for --config's model (SD v1 and 512 by default)."""
    import tempfile

    from benchmark_memory import DIFFUSERS_RUN, make_weights, peak_rss_gib
    ckpt, folder = make_weights(args.cache, args.config)
    size = int(args.sizes.split(",")[0])
    config = ["--config", args.config] if args.config else []
    for d in dtypes:
        if d == "fp16":
            continue  # CPU peak memory only
        with tempfile.TemporaryDirectory() as tmp:
            ours, _ = peak_rss_gib([sys.executable, ROOT / "scripts" / "txt2img.py", "--ckpt",
                                    ckpt, *config, "--H", size, "--W", size, "--n_samples", 1,
                                    "--n_iter", 1, "--ddim_steps", 2, "--precision",
                                    PRECISION[d], "--outdir", Path(tmp) / "ours",
                                    "--skip_grid", "--safety_checker", "none"])
            theirs, _ = peak_rss_gib([sys.executable, "-c", DIFFUSERS_RUN, folder, 2,
                                      Path(tmp) / "theirs.png", DTYPES[d], size])
        report.add("memory", f"peak RSS {size}x{size} {d}", None,
                   note=f"ours {ours:.2f} GiB, diffusers {theirs:.2f} GiB, "
                        f"ratio {ours / theirs:.2f}")


def fidelity_part(device, dtypes, report, n=8, out=ROOT / "docs" / "precision"):
    """The built-in model, DDIM 50 and the recommended sampler, n prompts and seeds: each
    reduced dtype's images against fp32's (PSNR), and a picture: fp32 row above each
    dtype's row."""
    from PIL import Image

    from ldm.pipeline import BUILTIN_DIR, Pipeline
    from sampler_study import PROMPTS, psnr
    prompts, seeds = (PROMPTS * n)[:n], list(range(n))
    out.mkdir(parents=True, exist_ok=True)

    def images(precision, **kw):
        pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", device=device, safety=False,
                             watermark=False, precision=precision)
        return [s.image for s in pipe.generate(prompts, seeds, progress=False, **kw)]
    for name, kw in (("DDIM 50", dict(sampler="ddim", steps=50)),
                     ("2M Karras 20", RECOMMENDED)):
        full = images("full", **kw)
        for d in dtypes:
            if d == "fp32":
                continue
            reduced = images(PRECISION[d], **kw)
            values = [psnr(a, b) for a, b in zip(full, reduced)]
            report.add("fidelity", f"built-in {name} {d} vs fp32", None,
                       note=f"PSNR mean {statistics.mean(values):.1f} dB, worst "
                            f"{min(values):.1f} dB over {n} images")
            w, h = full[0].size
            sheet = Image.new("RGB", (w * n, h * 2), "white")
            for i, (a, b) in enumerate(zip(full, reduced)):
                sheet.paste(a, (i * w, 0))
                sheet.paste(b, (i * w, h))
            path = out / f"builtin-{d}-vs-fp32-{kw['sampler']}.png"
            sheet.resize((w * n * 2, h * 4), Image.NEAREST).save(path)
            print(f"  top row fp32, bottom row {d}: {path.relative_to(ROOT)}", flush=True)
    speedup_pictures(device, report, prompts, seeds, psnr)


def sheet_of(rows, scale=2):
    """Rows of equal-sized PIL images as one picture, enlarged ``scale`` times."""
    from PIL import Image
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(map(len, rows)), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            sheet.paste(image, (i * w, r * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)


def speedup_pictures(device, report, prompts, seeds, psnr, out=ROOT / "docs" / "speedups"):
    """The built-in model: DeepCache 2 and 3 against the plain images (rows), and its
    autoencoder decoding a 256x256 shapes image whole, in blended tiles of 16 latent
    pixels (64 px) and in abutting unblended tiles, with the differences to the whole
    decode amplified 8x."""
    import numpy as np
    import torch
    from PIL import Image

    from ldm.data.shapes import render, sample_scene
    from ldm.image_io import tensor_to_pil
    from ldm.pipeline import BUILTIN_DIR, Pipeline
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", device=device, safety=False,
                         watermark=False, precision="full")
    for name, kw in (("DDIM 50", dict(sampler="ddim", steps=50)),
                     ("2M Karras 20", RECOMMENDED)):
        rows = []
        for n in (1, 2, 3):
            pipe.set_options(deepcache=n)
            rows.append([s.image for s in pipe.generate(prompts, seeds, progress=False, **kw)])
            if n > 1:
                values = [psnr(a, b) for a, b in zip(rows[0], rows[-1])]
                report.add("fidelity", f"built-in {name} --deepcache {n} vs plain", None,
                           note=f"PSNR mean {statistics.mean(values):.1f} dB, worst "
                                f"{min(values):.1f} dB over {len(values)} images")
        pipe.set_options()
        path = out / f"builtin-deepcache-{kw['sampler']}.png"
        sheet_of(rows).save(path)
        print(f"  rows: plain, --deepcache 2, --deepcache 3: {path.relative_to(ROOT)}", flush=True)
    image = Image.fromarray(render(sample_scene(np.random.default_rng(3), n_shapes=2), size=256))
    z = pipe.encode([image])
    model = pipe.model
    with torch.no_grad():
        whole = tensor_to_pil(model.decode_first_stage(z))[0]
        blended = tensor_to_pil(model.decode_first_stage(z, 16))[0]
        cut = tensor_to_pil(torch.cat([torch.cat([
            model.decode_first_stage(z[..., y:y + 16, x:x + 16]) for x in range(0, 64, 16)], -1)
            for y in range(0, 64, 16)], -2))[0]

    def amplified(a):
        d = np.abs(np.asarray(a, np.int16) - np.asarray(whole, np.int16)) * 8
        return Image.fromarray(np.clip(d, 0, 255).astype(np.uint8))
    report.add("fidelity", "built-in VAE 256x256 tiles of 16 (64 px) vs whole", None,
               note=f"blended PSNR {psnr(blended, whole):.1f} dB, unblended "
                    f"{psnr(cut, whole):.1f} dB")
    path = out / "builtin-vae-tiling.png"
    sheet_of([[whole, blended, cut], [image, amplified(blended), amplified(cut)]], 1).save(path)
    print(f"  top: whole, blended tiles, unblended tiles; bottom: the input, differences x8: "
          f"{path.relative_to(ROOT)}", flush=True)


OPTIONS = {"deepcache2": ("--deepcache 2", dict(deepcache=2)),
           "deepcache3": ("--deepcache 3", dict(deepcache=3)),
           "slicing": ("--attention_slicing", dict(attention_slicing=1024)),
           "compile": ("--compile", dict(compile=True))}


def options_part(args, device, dtypes, sizes, report):
    """Ours with each option against ours without, alternating, on the same noise: random
    SD weights at each size, then the built-in model."""
    import numpy as np
    import torch
    from ldm.compare import random_sd
    from ldm.pipeline import BUILTIN_DIR, Pipeline
    from sampler_study import psnr

    def run(pipe, size, **options):
        pipe.set_options(**options)
        z = pipe.latents(PROMPT, 0, height=size, width=size, progress=False, **RECOMMENDED)
        return z, pipe.decode(z)[0]

    def compare(pipe, size, label):
        with torch.inference_mode():
            z, image = run(pipe, size)  # the plain run's result, for the distances
        chosen = list(OPTIONS) if args.options == "all" else args.options.split(",")
        for name, options in (OPTIONS[k] for k in chosen):
            start = time.perf_counter()
            with torch.inference_mode():
                z_opt, image_opt = run(pipe, size, **options)  # warm-up (compiles)
            warm = time.perf_counter() - start
            m = timed({"plain": lambda: run(pipe, size),
                       "option": lambda: run(pipe, size, **options)},
                      args.image_repeats, device, warmup=False)
            pipe.set_options()  # all off again (--compile: back to eager)
            rel = float((z_opt - z).norm() / z.norm())
            exact = np.array_equal(np.asarray(image_opt), np.asarray(image))
            report.add("options", f"{label} {name}", m["option"],
                       note=f"plain {m['plain']:.3f} s, speed-up {m['plain'] / m['option']:.2f}x; "
                            + ("image identical" if exact else
                               f"PSNR {psnr(image_opt, image):.1f} dB, latents {rel:.2e}")
                            + (f"; first run {warm:.0f} s" if options.get("compile") else ""))
    model, _ = random_sd()
    model.to(device)
    for d in dtypes:  # fp32 first: the casts are one way
        pipe = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random SD v1")
        for s in sizes:
            compare(pipe, s, f"{s}x{s} {d} 2M Karras 20")
        torch._dynamo.reset()  # drop the compiled code and its frozen copy of the weights
        gc.collect()
    del model, pipe
    gc.collect()
    for d in dtypes:
        pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", device=device, safety=False,
                             watermark=False, precision=PRECISION[d])
        compare(pipe, pipe.native_size, f"built-in {d} 2M Karras 20")


TILING_RUN = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from ldm.compare import random_sd
from ldm.pipeline import Pipeline
model, _ = random_sd()
pipe = Pipeline(model, torch.device("cpu"), {precision!r}, watermark=False)
pipe.set_options(vae_tiling={tile})
z = torch.randn(1, 4, {side} // 8, {side} // 8, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
image = pipe.decode(z)[0]
seconds = time.perf_counter() - start
image.save({out!r})
print(seconds, before / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def tiling_part(args, dtypes, report, side=1024):
    """A 1024x1024 VAE decode in a fresh process, whole and in 512-px tiles: seconds, peak
    RSS (and the RSS before the decode: the weights), PSNR of the tiled image."""
    import subprocess
    import tempfile

    from PIL import Image

    from sampler_study import psnr
    for d in dtypes:
        if d == "fp16":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            got = {}
            for tile in (None, 64):
                out = str(Path(tmp) / f"{tile}.png")
                code = TILING_RUN.format(root=str(ROOT), precision=PRECISION[d], tile=tile,
                                         side=side, out=out)
                line = subprocess.run([sys.executable, "-c", code], check=True,
                                      capture_output=True, text=True).stdout.split()
                got[tile] = [float(v) for v in line] + [Image.open(out).convert("RGB")]
            (t0, b0, p0, whole), (t1, b1, p1, tiled_image) = got[None], got[64]
            report.add("tiling", f"VAE decode {side}x{side} {d} --vae_tiling", t1,
                       note=f"whole {t0:.1f} s; peak RSS {p1:.2f} GiB against {p0:.2f} GiB "
                            f"(decoder activations {p1 - b1:.2f} against {p0 - b0:.2f} GiB); "
                            f"PSNR to the whole decode {psnr(tiled_image, whole):.1f} dB")




def fewstep_part(args, device, dtypes, report, size=512):
    """The few-step rows: LCM-LoRA 4 steps (+ TAESD) against diffusers' LCM pipeline on
    the same weights, and against diffusers' default pipeline (PNDM 50)."""
    import tempfile

    import diffusers
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from ldm.compare import diffusers_components, kohya_lora, random_sd
    from ldm.pipeline import Pipeline, read_tiny_vae

    model, config = random_sd(config_path=args.config)
    tmp = Path(tempfile.mkdtemp())
    lora = tmp / "lcm-lora-sdv1-5.safetensors"
    # a mild LoRA (alpha 1 on rank 64): random weights that it changed much would turn
    # chaotic, and every rounding difference would show in the PSNR
    save_file(kohya_lora(model, rank=64, alpha=1.0, seed=1, te=False), lora)
    components = diffusers_components(model, config, tmp / "tokenizer")
    theirs = diffusers.StableDiffusionPipeline(**components).to(device)
    theirs.set_progress_bar_config(disable=True)
    default_attention(theirs)
    pndm = diffusers.PNDMScheduler.from_config(theirs.scheduler.config, skip_prk_steps=True)
    lcm = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora_weights()
    full_vae = theirs.vae
    torch.manual_seed(3)
    tiny_theirs = diffusers.AutoencoderTiny().eval()   # its own (random) initialisation
    tiny_theirs.save_pretrained(tmp / "taesd")
    tiny_ours, _ = read_tiny_vae(model, tmp / "taesd")
    full_ours = model.first_stage_model
    ours = Pipeline(model, device, "full", watermark=False, model_name="random SD")
    ours.set_loras([(lora, 1.0)])   # merged into the UNet, as fused on their side
    for d in dtypes:  # fp32 first: the casts are one way
        dtype = getattr(torch, DTYPES[d])
        theirs.to(dtype=dtype)
        tiny_theirs.to(device, dtype)

        for vae in (tiny_ours, full_ours):   # each cast as a Pipeline casts its model
            model.first_stage_model = vae
            pipe = Pipeline(model, device, PRECISION[d], watermark=False,
                            model_name="random SD")

        def ours_run(vae, **kw):
            def run():
                model.first_stage_model = vae
                return pipe.generate(PROMPT, seeds=0, height=size, width=size,
                                     progress=False, **kw)[0].image
            return run

        def theirs_run(scheduler, vae, steps, scale):
            def run():
                theirs.scheduler, theirs.vae = scheduler, vae
                return theirs(PROMPT, num_inference_steps=steps, guidance_scale=scale,
                              height=size, width=size,
                              generator=torch.Generator("cpu").manual_seed(0)).images[0]
            return run
        lcm4 = dict(sampler="lcm", steps=4, scale=1.0)
        with torch.inference_mode():   # warm-up: 1-step images
            ours_run(full_ours, sampler="lcm", steps=1, scale=1.0)()
            ours_run(tiny_ours, sampler="lcm", steps=1, scale=1.0)()
            theirs_run(lcm, full_vae, 1, 1.0)()
            theirs_run(lcm, tiny_theirs, 1, 1.0)()
        setting = f"{size}x{size} {d}"
        for label, vae_ours, vae_theirs in (("", full_ours, full_vae),
                                            (" + TAESD", tiny_ours, tiny_theirs)):
            images = {}

            def keep(name, fn):
                def run():
                    images[name] = fn()
                return run
            m = timed({"ours": keep("ours", ours_run(vae_ours, **lcm4)),
                       "diffusers": keep("diffusers", theirs_run(lcm, vae_theirs, 4, 1.0))},
                      args.image_repeats, device, warmup=False)
            a, b = (np.asarray(images[k], dtype=np.float64) for k in ("ours", "diffusers"))
            mse = float(((a - b) ** 2).mean())
            psnr = 10 * np.log10(255 ** 2 / mse) if mse else float("inf")
            report.add("fewstep", f"{setting} LCM 4{label} / LCM 4{label}", m["ours"],
                       m["diffusers"], paired=m["paired"], note=f"PSNR to diffusers {psnr:.1f} dB")
        m = timed({"ours": ours_run(tiny_ours, **lcm4),
                   "diffusers": theirs_run(pndm, full_vae, 50, 7.5)},
                  args.image_repeats, device, warmup=False)
        report.add("fewstep", f"{setting} LCM 4 + TAESD / PNDM 50", m["ours"], m["diffusers"],
                   paired=m["paired"])
        model.first_stage_model = full_ours
        gc.collect()



def fixedshape_part(args, device, dtypes, report, size=512):
    """One UNet step (batch 2, t = 501) at one shape: eager against the forms compiled
    ahead of time for that shape. Each form is timed alternately with eager after its own
    warm-up (whose time, compilation included, is reported); a form that fails to build is
    reported with its error's first line."""
    import tempfile

    import torch
    from ldm.compare import random_sd
    from ldm.pipeline import Pipeline

    model, config = random_sd(config_path=args.config)
    gflop = sd_flops(config, [size])["unet", size]
    gen = torch.Generator("cpu").manual_seed(0)
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=gen).to(device)
    t = torch.full((2,), 501, device=device)
    ctx = torch.randn(2, 77, context_width(config), generator=gen).to(device)
    tmp = Path(tempfile.mkdtemp())
    for d in sorted(dtypes, key=lambda d: d != "fp32"):   # fp32 first: the casts are one way
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random SD")
        unet = model.model.diffusion_model
        peak = matmul_peak(device, dtype)
        report.add("peak", f"matmul {d}", None, note=f"{peak:.1f} GFLOP/s")

        class Step(torch.nn.Module):   # what a sampler step calls, autocast included
            def __init__(self):
                super().__init__()
                self.unet = unet

            def forward(self, x, t, ctx):
                with ours.autocast:
                    return self.unet(x, t, context=ctx)
        step = Step().eval()

        def eager():
            return step(x, t, ctx)
        with torch.inference_mode():
            want = eager().float()

        def build_compile():
            ours.set_options(compile=True)
            return lambda: step(x, t, ctx)

        def build_aoti():
            from torch._inductor import aoti_compile_and_package, aoti_load_package
            with torch.no_grad():
                exported = torch.export.export(step, (x, t, ctx))
                path = aoti_compile_and_package(
                    exported, package_path=str(tmp / f"unet-{d}.pt2"),
                    inductor_configs={"freezing": True})
            runner = aoti_load_package(path)
            return lambda: runner(x, t, ctx)

        def build_onednn():
            torch.jit.enable_onednn_fusion(True)
            with torch.no_grad():
                traced = torch.jit.freeze(torch.jit.trace(step, (x, t, ctx), check_trace=False))
            traced(x, t, ctx)   # the profiling runs that let the fuser rewrite the graph
            return lambda: traced(x, t, ctx)

        for name, build in (("torch.compile static", build_compile),
                            ("export + AOTInductor", build_aoti),
                            ("oneDNN Graph (TorchScript)", build_onednn)):
            setting = f"{size}x{size} batch 2 {d} {name}"
            start = time.perf_counter()
            try:
                with torch.inference_mode() if name != "export + AOTInductor" else \
                        torch.no_grad():
                    fn = build()
                    got = fn().float()
            except Exception as e:   # report it and go on: this is a study
                report.add("fixedshape", setting, None,
                           note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            built = time.perf_counter() - start
            err = float((got - want).norm() / want.norm())
            m = timed({"eager": eager, "form": fn}, args.repeats, device, warmup=False)
            report.add("fixedshape", setting, m["form"], gflop=gflop, peak=peak,
                       note=f"eager {m['eager']:.3f} s ({gflop / m['eager']:.0f} GFLOP/s, "
                            f"{gflop / m['eager'] / peak:.0%} of peak), speed-up "
                            f"{m['eager'] / m['form']:.2f}x; build + first call {built:.0f} s; "
                            f"rel. distance to eager {err:.1e}")
            if name == "torch.compile static":
                ours.set_options()
                torch._dynamo.reset()
            if name.startswith("oneDNN"):
                torch.jit.enable_onednn_fusion(False)
            del fn
            gc.collect()


def controlnet_part(args, device, dtypes, report, size=512):
    """A ControlNet's extra cost per UNet step, ours against diffusers on the same weights:
    each side's step with the ControlNet (its residuals, then the UNet given them) and
    without, alternating."""
    import tempfile

    import torch
    from ldm.compare import diffusers_components, random_sd, to_diffusers_controlnet
    from ldm.controlnet import build_controlnet
    from ldm.pipeline import Pipeline

    model, config = random_sd(config_path=args.config)
    net = build_controlnet(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[1:].numel() if p.dim() > 1
                                                           else 1) ** -0.5)
    tmp = Path(tempfile.mkdtemp())
    their_unet = diffusers_components(model, config, tmp / "tok")["unet"]
    their_net = to_diffusers_controlnet(net, config)[0]
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=gen).to(device)
    hint = torch.rand(2, 3, size, size, generator=gen).to(device)
    t = torch.full((2,), 501, device=device)
    ctx = torch.randn(2, 77, context_width(config), generator=gen).to(device)
    unet = model.model.diffusion_model
    for d in sorted(dtypes, key=lambda d: d != "fp32"):   # fp32 first: the casts are one way
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random SD")
        from ldm.devices import cast_weights
        cast_weights(net.to(device), dtype)
        their_unet.to(device, dtype)
        their_net.to(device, dtype)

        def ours_plain():
            with ours.autocast:
                return unet(x, t, context=ctx)

        def ours_control():
            with ours.autocast:
                return unet(x, t, context=ctx, control=net(x, hint, t, ctx))

        def theirs_plain():
            return their_unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample

        def theirs_control():
            down, mid = their_net(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype),
                                  controlnet_cond=hint.to(dtype), return_dict=False)
            return their_unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype),
                              down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
        with torch.inference_mode():
            a, b = ours_control().float(), theirs_control().float()
        err = float((a - b).norm() / b.norm())
        m = timed({"ours": ours_control, "diffusers": theirs_control,
                   "ours plain": ours_plain, "diffusers plain": theirs_plain},
                  args.repeats, device)
        extra_ours = m["ours"] - m["ours plain"]
        extra_theirs = m["diffusers"] - m["diffusers plain"]
        report.add("controlnet", f"{size}x{size} batch 2 {d} step + ControlNet", m["ours"],
                   m["diffusers"], paired=m["paired"],
                   note=f"without: ours {m['ours plain']:.3f} s, diffusers "
                        f"{m['diffusers plain']:.3f} s; extra per step: ours {extra_ours:.3f} s "
                        f"(+{extra_ours / m['ours plain']:.0%}), diffusers {extra_theirs:.3f} s "
                        f"(+{extra_theirs / m['diffusers plain']:.0%}); rel. distance "
                        f"{err:.1e}")


def hires_part(args, device, dtypes, report, size=512):
    """The hires fix size -> 2 x size on the same random SD weights: ours (one call) against
    diffusers composed as A1111 runs it (latents out, bilinear interpolation, img2img
    running the same 20 steps); each side's first pass alone as well."""
    import tempfile

    import diffusers
    import torch
    import torch.nn.functional as F
    from ldm.compare import diffusers_components, random_sd
    from ldm.pipeline import Pipeline

    model, config = random_sd(config_path=args.config)
    components = diffusers_components(model, config, Path(tempfile.mkdtemp()) / "tok")
    karras = diffusers.DPMSolverMultistepScheduler.from_config(
        components["scheduler"].config, use_karras_sigmas=True)
    first = diffusers.StableDiffusionPipeline(**dict(components, scheduler=karras))
    second = diffusers.StableDiffusionImg2ImgPipeline(**dict(components, scheduler=karras))
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    hr = dict(scale=2, upscaler="latent", strength=0.7)
    n = int(20 / 0.7)   # A1111's schedule for 20 hires steps at 0.7; diffusers runs int(n s)
    s2 = (20 + 0.5) / n
    for d in sorted(dtypes, key=lambda d: d != "fp32"):
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random SD")
        first.to(device, dtype)   # the components second shares

        def ours_first():
            return ours.generate(PROMPT, 1, progress=False, height=size, width=size,
                                 **RECOMMENDED)

        def ours_hires():
            return ours.generate(PROMPT, 1, progress=False, height=size, width=size,
                                 hires=hr, **RECOMMENDED)

        def theirs_first(output_type="pil"):
            return first(PROMPT, height=size, width=size, num_inference_steps=20,
                         generator=torch.Generator().manual_seed(1), output_type=output_type
                         ).images

        def theirs_hires():
            z = theirs_first("latent")
            z = F.interpolate(z, scale_factor=2, mode="bilinear")
            return second(PROMPT, image=z, strength=s2, num_inference_steps=n,
                          generator=torch.Generator().manual_seed(1)).images
        ours.generate(PROMPT, 1, progress=False, height=size, width=size, steps=2,
                      hires=dict(hr, steps=2))   # warm-ups at both sizes, both sides
        first(PROMPT, height=size, width=size, num_inference_steps=2)
        second(PROMPT, image=torch.randn(1, 4, size // 4, size // 4), strength=0.5,
               num_inference_steps=4)
        m = timed({"ours": ours_hires, "diffusers": theirs_hires, "ours first": ours_first,
                   "diffusers first": theirs_first}, args.image_repeats, device, warmup=False)
        report.add("hires", f"{size}->{2 * size} {d} 20 + 20 steps", m["ours"], m["diffusers"],
                   paired=m["paired"],
                   note=f"first pass alone: ours {m['ours first']:.1f} s, diffusers "
                        f"{m['diffusers first']:.1f} s; second pass + upscale: ours "
                        f"{m['ours'] - m['ours first']:.1f} s, diffusers "
                        f"{m['diffusers'] - m['diffusers first']:.1f} s")


def upscale_part(args, device, dtypes, report):
    """The SD x4 upscaler on random weights: a tile's UNet step against diffusers', then a
    whole 512 -> 2048 upscale of ours in tiles."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image
    from ldm.compare import diffusers_components, random_sd
    from ldm.pipeline import Pipeline

    model, config = random_sd(config_path=ROOT / "configs/stable-diffusion/x4-upscaling.yaml")
    their_unet = diffusers_components(model, config, Path(tempfile.mkdtemp()) / "tok")["unet"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 128, 128, generator=gen).to(device)
    t = torch.full((2,), 501, device=device)
    level = torch.full((2,), 20, device=device)
    ctx = torch.randn(2, 77, 1024, generator=gen).to(device)
    unet = model.model.diffusion_model
    rng = np.random.RandomState(0)
    image = Image.fromarray((np.kron(rng.rand(64, 64, 3), np.ones((8, 8, 1))) * 255)
                            .astype(np.uint8))   # 512 x 512
    for d in sorted(dtypes, key=lambda d: d != "fp32"):
        dtype = getattr(torch, DTYPES[d])
        ours = Pipeline(model, device, PRECISION[d], watermark=False, model_name="random x4")
        their_unet.to(device, dtype)

        def ours_step():
            with ours.autocast:
                return unet(x, t, context=ctx, y=level)

        def theirs_step():
            return their_unet(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype),
                              class_labels=level).sample
        with torch.inference_mode():
            a, b = ours_step().float(), theirs_step().float()
        err = float((a - b).norm() / b.norm())
        m = timed({"ours": ours_step, "diffusers": theirs_step}, args.repeats, device)
        report.add("upscale", f"x4 UNet step 128x128 tile batch 2 {d}", m["ours"],
                   m["diffusers"], paired=m["paired"], note=f"rel. distance {err:.1e}")
        if d != sorted(dtypes, key=lambda d: d != "fp32")[-1] or not args.upscale_steps:
            continue   # the whole image in the last dtype only (bf16 on a CPU): minutes each
        steps = args.upscale_steps
        start = time.perf_counter()
        out = ours.upscale("a photograph", 1, image, steps=steps, progress=False)[0]
        whole = time.perf_counter() - start
        tiles = out.parameters["tiles"]
        at75 = whole + (75 - ours.num_steps(steps)) * tiles * m["ours"]
        report.add("upscale", f"512->2048 {tiles} tiles {steps} steps {d}", whole,
                   note=f"75 steps (diffusers' default) about {at75 / 60:.0f} min from the "
                        f"step time above")


if __name__ == "__main__":
    main()
